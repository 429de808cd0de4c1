"""Generate docs/recipe-reference.md from the pydantic recipe schema (run after changing recipe.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from efquant_fx.recipe import Recipe

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("efquant_fx.recipe.", "")
    return text.replace("<class '", "").replace("'>", "")


def _section(model: type[BaseModel], prefix: str, lines: list[str], seen: set[str]) -> None:
    nested: list[tuple[type[BaseModel], str]] = []
    lines += [f"## `{prefix or 'top level'}`", "", (model.__doc__ or "").strip(), "",
              "| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = "(section)"
        lines.append(f"| `{name}` | `{_type_name(field.annotation)}` | `{default!r}` | {field.description or ''} |")
        for sub in getattr(field.annotation, "__args__", ()) + (field.annotation,):
            if isinstance(sub, type) and issubclass(sub, BaseModel) and sub.__name__ not in seen:
                seen.add(sub.__name__)
                nested.append((sub, f"{prefix}.{name}" if prefix else name))
            for inner in getattr(sub, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner.__name__ not in seen:
                    seen.add(inner.__name__)
                    nested.append((inner, f"{prefix}.{name}[]" if prefix else f"{name}[]"))
    lines.append("")
    for sub, sub_prefix in nested:
        _section(sub, sub_prefix, lines, seen)


def render() -> str:
    lines = ["# Recipe reference", "",
             "Generated from `efquant_fx/recipe.py` by `python scripts/gen_recipe_reference.py`; do not edit.",
             "Strings may use `${EFQUANT_SHARED}` and other environment variables. Unknown fields are errors.", ""]
    _section(Recipe, "", lines, set())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing it")
    args = ap.parse_args()
    text = render()
    if args.check:
        sys.exit(0 if OUT.read_text() == text else "docs/recipe-reference.md is stale: rerun the generator")
    OUT.write_text(text)
    print(f"wrote {OUT}")
