"""Property-based tests (hypothesis) of what users hand us: recipes, list files and pair lists.

* any mapping is either a valid recipe or a :class:`RecipeError` whose every line names a field that
  is really in the input; a wrong type or out-of-range value anywhere in the schema names that field;
  valid recipes survive save -> load unchanged (same hash); any ``--set`` override on any mapping, and
  any YAML text (anchors, aliases, merge keys, tags), is a recipe or a :class:`RecipeError`;
* list files and pair lists parse or fail with an :class:`EfquantError`, never anything else; whatever
  they accept stays inside the data root, and valid ones read back exactly what was written.

Every example runs under :func:`no_hang`, which turns a reader that never returns into a failure.
"""

from __future__ import annotations

import math
import os
import signal
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from efquant_fx.errors import EfquantError, RecipeError
from efquant_fx.recipe import Recipe, load_recipe, validate_recipe

HANG_S = 10.0  # per example; far above any real parse, only there to stop a runaway loop


class Hang(BaseException):  # noqa: N818 - BaseException so no ``except Exception`` in the code under test hides it
    """A reader kept running on a tiny input."""


@contextmanager
def no_hang(seconds: float = HANG_S) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s on a tiny input")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: examples per property; ``EFQUANT_FUZZ_EXAMPLES=5000 pytest tests/test_reliability_properties.py tests/*/*_fuzz.py``
#: searches deeper (the default keeps each file well under 30 s on 2 busy cores)
EXAMPLES = int(os.environ.get("EFQUANT_FUZZ_EXAMPLES", "100"))
FAST = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw, blob: bytes, max_edits: int = 4) -> bytes:
    """``blob`` with a few random edits: flipped, overwritten, inserted or deleted bytes, or a truncation."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


# ----------------------------------------------------------------------------- recipe schema


def _unwrap(annotation: typing.Any) -> typing.Any:
    """``X | None`` -> ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def scalar_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, typing.Any]]:
    """Dotted paths of every int/float/bool/Literal field in the schema, recursing into sections."""
    out = []
    for name, info in model.model_fields.items():
        kind = _unwrap(info.annotation)
        path = f"{prefix}{name}"
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += scalar_fields(kind, path + ".")
        elif kind in (int, float, bool) or typing.get_origin(kind) is typing.Literal:
            out.append((path, info))
    return out


SCALARS = scalar_fields(Recipe)
RANGED = [(p, info) for p, info in SCALARS
          if any(hasattr(m, a) for m in info.metadata for a in ("ge", "gt", "le", "lt"))]


def nest(path: str, value: typing.Any) -> dict:
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def bounds(info) -> tuple[float | None, float | None, bool, bool]:
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        if hasattr(m, "ge"):
            lo = m.ge
        if hasattr(m, "gt"):
            lo, lo_open = m.gt, True
        if hasattr(m, "le"):
            hi = m.le
        if hasattr(m, "lt"):
            hi, hi_open = m.lt, True
    return lo, hi, lo_open, hi_open


@st.composite
def out_of_range(draw, info) -> float:
    lo, hi, lo_open, hi_open = bounds(info)
    integer = _unwrap(info.annotation) is int
    sides = [s for s, b in (("low", lo), ("high", hi)) if b is not None]
    side = draw(st.sampled_from(sides))
    if side == "low":
        top = lo if lo_open else lo - (1 if integer else 1e-6)
        return draw(st.integers(max_value=int(math.floor(top)))) if integer else \
            draw(st.floats(max_value=top, allow_nan=False, allow_infinity=False))
    bottom = hi if hi_open else hi + (1 if integer else 1e-6)
    return draw(st.integers(min_value=int(math.ceil(bottom)))) if integer else \
        draw(st.floats(min_value=bottom, allow_nan=False, allow_infinity=False))


# not a number, not a bool word pydantic accepts ("y", "on", ...), not any Literal choice
WRONG_TYPE = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.text(alphabet="xzq", min_size=1, max_size=5),
)

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def section(model: type[BaseModel]) -> st.SearchStrategy:
    """Mappings that mostly use the section's own keys (so validation goes deep), sometimes others."""
    keys = st.sampled_from(sorted(model.model_fields)) | st.text(max_size=6)
    return st.dictionaries(keys, JSONISH, max_size=5)


SECTIONS = {name: section(_unwrap(info.annotation)) | JSONISH for name, info in Recipe.model_fields.items()
            if isinstance(_unwrap(info.annotation), type) and issubclass(_unwrap(info.annotation), BaseModel)}
ANY_RECIPE = st.fixed_dictionaries({}, optional={**{k: JSONISH for k in Recipe.model_fields}, **SECTIONS}) | \
    st.dictionaries(st.text(max_size=6) | st.integers(), JSONISH, max_size=4)


def shown(key: typing.Any) -> str:
    """How an error line writes a key: quoted when it is empty, padded with spaces or unprintable."""
    if isinstance(key, str) and (not key or key != key.strip() or not key.isprintable()):
        return repr(key)
    return str(key)


@FAST
@given(data=ANY_RECIPE)
def test_any_mapping_is_a_recipe_or_errors_that_name_its_fields(data):
    try:
        with no_hang():
            recipe = validate_recipe(data, "r.yaml")
    except RecipeError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line.startswith("r.yaml: "), line
            where = line.removeprefix("r.yaml: ")
            # the field is one the user wrote (an empty key too: it is written '')
            assert any(where.startswith(f"{shown(k)}.") or where.startswith(f"{shown(k)}: ") for k in data), line
    else:
        assert isinstance(recipe, Recipe)


@pytest.mark.parametrize("path, info", SCALARS, ids=[p for p, _ in SCALARS])
@settings(max_examples=8, deadline=2000)
@given(data=st.data())
def test_a_wrong_type_names_the_field(path, info, data):
    value = data.draw(WRONG_TYPE)
    with pytest.raises(RecipeError) as err:
        validate_recipe(nest(path, value), "r.yaml")
    assert any(line.startswith(f"r.yaml: {path}: ") for line in err.value.problems), err.value.problems


@pytest.mark.parametrize("path, info", RANGED, ids=[p for p, _ in RANGED])
@settings(max_examples=8, deadline=2000)
@given(data=st.data())
def test_an_out_of_range_value_names_the_field_and_the_value(path, info, data):
    value = data.draw(out_of_range(info))
    with pytest.raises(RecipeError) as err:
        validate_recipe(nest(path, value), "r.yaml")
    line = next(line for line in err.value.problems if line.startswith(f"r.yaml: {path}: "))
    assert f"(got {value!r})" in line


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="$"), max_size=20)
VALID = st.fixed_dictionaries({}, optional={
    "name": TEXT,
    "description": TEXT,
    "seed": st.integers(0, 2**31),
    "device": st.sampled_from(["auto", "cpu", "cuda"]),
    "quant": st.fixed_dictionaries({}, optional={
        "weight_bits": st.integers(2, 8), "act_bits": st.integers(2, 8),
        "weight_granularity": st.sampled_from(["per_channel", "per_tensor"]),
        "observer": st.sampled_from(["minmax", "moving_average", "percentile", "mse"]),
        "percentile": st.floats(50.001, 100), "exclude": st.lists(st.sampled_from(["^fc$", "conv1", r"layer\d"])),
        "layers": st.lists(st.fixed_dictionaries({"match": st.sampled_from(["^fc$", "body.0"])},
                                                 optional={"weight_bits": st.integers(2, 8), "skip": st.booleans()}),
                           max_size=2),
        "batchnorm": st.sampled_from(["keep", "fold", "reestimate"]),
    }),
    "calibration": st.fixed_dictionaries({}, optional={
        "images": st.integers(1, 10**6), "batch_size": st.integers(1, 512),
        "data": st.fixed_dictionaries({"kind": st.sampled_from(["folder", "list", "random"])},
                                      optional={"root": TEXT, "max_images": st.integers(1, 10**6)}),
    }),
    "prune": st.fixed_dictionaries({"kind": st.sampled_from(["none", "unstructured", "channels"])},
                                   optional={"sparsity": st.floats(0.001, 0.999)}),
    "finetune": st.fixed_dictionaries({}, optional={
        "steps": st.integers(1, 10**5), "lr": st.floats(1e-8, 1.0), "momentum": st.floats(0, 0.999),
        "optimizer": st.sampled_from(["sgd", "adamw"]), "clip_grad_norm": st.none() | st.floats(0.01, 100),
        "losses": st.dictionaries(st.sampled_from(["kd_mse", "ekd", "kd_cosine"]),
                                  st.fixed_dictionaries({"weight": st.floats(0, 10)}), min_size=1),
        "max_bad_steps": st.integers(0, 100), "checkpoint_every": st.integers(1, 1000),
    }),
    "eval": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["lfw", "cfp_fp"]),
                                            "kind": st.just("bin")}), max_size=2),
})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@FAST
@given(data=VALID)
def test_valid_recipes_round_trip_through_save_and_load(work, data):
    recipe = validate_recipe(data)
    path = recipe.save(work / "recipe.yaml")
    again = load_recipe(path)
    assert again == recipe and again.hash == recipe.hash
    assert load_recipe(yaml.safe_load(recipe.to_yaml())).hash == recipe.hash


KEY_PART = st.sampled_from(["quant", "exclude", "weight_bits", "layers", "eval", "finetune", "data", "root",
                            "0", "1", "9", "-1", "x", "", " "]) | st.text(max_size=4)


@FAST
@given(data=ANY_RECIPE, key=st.lists(KEY_PART, min_size=1, max_size=4).map(".".join), raw=st.text(max_size=20))
def test_any_override_applies_or_is_one_clear_error(data, key, raw):
    """``--set key=value`` into any shape of recipe: a recipe, or lines that name the override or a field."""
    try:
        with no_hang():
            recipe = load_recipe(data, [f"{key}={raw}"])
    except RecipeError as exc:
        assert exc.problems and all(line.startswith(("--set: ", "<recipe>: ")) for line in exc.problems), exc
    else:
        assert isinstance(recipe, Recipe)


YAML_TEXT = st.lists(st.sampled_from(["&a ", "&b ", "*a", "*b", "[", "]", "{", "}", ", ", ": ", "- ", "\n", "\n  ",
                                      "<<: ", "quant", "name", "x", "1", "'", '"', "!!str ", "? ", "#"]),
                     max_size=40).map("".join)


@FAST
@given(text=YAML_TEXT)
def test_any_yaml_text_is_a_recipe_or_one_clear_error(work, text):
    path = work / "any.yaml"
    path.write_text(text)
    try:
        with no_hang():
            load_recipe(path)
    except RecipeError as exc:
        assert all(line.startswith(f"{path}: ") for line in exc.problems), exc.problems


# ----------------------------------------------------------------------------- list files


SEGMENT = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,6}[A-Za-z0-9_]|[A-Za-z0-9_]", fullmatch=True)
REL_PATH = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)


def inside(root: Path, path: Path | str) -> bool:
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(os.path.join(base, path))]) == base


@FAST
@given(entries=st.lists(st.tuples(REL_PATH, st.integers(0, 10**6), st.sampled_from(["\t", " ", "  \t"])),
                        min_size=1, max_size=8),
       newline=st.sampled_from(["\n", "\r\n"]))
def test_a_valid_list_file_reads_back_exactly(work, entries, newline):
    from efquant_fx.data.listfile import read_list

    path = work / "list.txt"
    path.write_bytes(newline.join(f"{p}{sep}{label}" for p, label, sep in entries).encode())
    paths, labels = read_list(path)
    assert paths == [os.path.normpath(p) for p, _, _ in entries]
    assert labels == [label for _, label, _ in entries]


LINE_PARTS = st.sampled_from(["..", ".", "/", "\\", "a", "b c", "~", "\t", " ", "#", "-1", "7", "é", "\x00", "C:"])
LIST_TEXT = st.lists(st.lists(LINE_PARTS, max_size=6).map("".join), max_size=6).map("\n".join)


@FAST
@given(content=st.binary(max_size=200) | LIST_TEXT.map(str.encode))
def test_any_list_file_parses_inside_the_root_or_is_refused(work, content):
    from efquant_fx.data.listfile import read_list

    path = work / "list.txt"
    path.write_bytes(content)
    try:
        with no_hang():
            paths, labels = read_list(path)
    except EfquantError as exc:
        assert str(exc).startswith(str(path))  # names the file (and the line, for a bad line)
        return
    assert paths and len(paths) == len(labels) and min(labels) >= 0
    assert all(inside(work / "root", p) for p in paths)


@FAST
@given(rel=REL_PATH, ups=st.integers(1, 4), absolute=st.booleans())
def test_list_entries_leaving_the_root_are_refused(work, rel, ups, absolute):
    from efquant_fx.data.listfile import read_list

    depth = rel.count("/") + 1
    escaping = f"/{rel}" if absolute else rel + "/.." * (depth + ups) + "/x.jpg"
    path = work / "list.txt"
    path.write_text(f"ok.jpg\t0\n{escaping}\t1\n")
    with pytest.raises(EfquantError, match=r"list.txt:2: path: .*(absolute path|escapes the data root)"):
        read_list(path)


# ----------------------------------------------------------------------------- pair lists


# tokens that exercise both formats: numbers (also Unicode digits int() accepts or refuses), names, escapes
PAIR_FIELD = st.sampled_from(["..", "../a", "/etc", "a", "b/../..", "x.jpg", "1", "0", "true", "same", "10", "²",
                              "٣", "#", "-1", "a\x00", "9" * 12]) | st.text(max_size=4)
PAIR_TEXT = st.lists(st.lists(PAIR_FIELD, min_size=1, max_size=4).map(" ".join), max_size=5).map("\n".join)


@FAST
@given(content=st.binary(max_size=200) | PAIR_TEXT.map(str.encode))
def test_any_pairs_file_parses_inside_the_root_or_is_refused(work, content):
    from efquant_fx.eval.pairs import read_pairs

    path, root = work / "pairs.txt", work / "root"
    path.write_bytes(content)
    try:
        with no_hang():
            pairs = read_pairs(path, root)
    except EfquantError as exc:
        assert str(exc).startswith(str(path))
        return
    assert len(pairs.left) == len(pairs.right) == len(pairs.issame)
    assert all(inside(root, p) for p in pairs.left + pairs.right)


@FAST
@given(rows=st.lists(st.tuples(REL_PATH, REL_PATH, st.booleans()), min_size=1, max_size=6))
def test_a_valid_plain_pairs_file_reads_back_exactly(work, rows):
    from efquant_fx.eval.pairs import read_pairs

    rows = [(a.replace(" ", "_"), b.replace(" ", "_"), same) for a, b, same in rows]  # fields split on spaces
    path, root = work / "pairs.txt", work / "root"
    path.write_text("".join(f"{a} {b} {int(same)}\n" for a, b, same in rows))
    pairs = read_pairs(path, root)
    assert pairs.left == [Path(os.path.normpath(os.path.abspath(root / a))) for a, _, _ in rows]
    assert pairs.right == [Path(os.path.normpath(os.path.abspath(root / b))) for _, b, _ in rows]
    assert pairs.issame == [same for _, _, same in rows]


@FAST
@given(name=SEGMENT, ups=st.integers(1, 3))
def test_lfw_names_leaving_the_root_are_refused(work, name, ups):
    from efquant_fx.eval.pairs import read_pairs

    path = work / "pairs.txt"
    bad = "/".join([".."] * ups + [name.replace(" ", "_")])
    path.write_text(f"1\t1\nok\t1\t2\n{bad}\t1\tok\t2\n")
    with pytest.raises(EfquantError, match=r"pairs.txt: line 3: image path .* escapes the data root"):
        read_pairs(path, work / "root")
