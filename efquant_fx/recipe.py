"""Declarative, versioned recipes: what to compress, how, and how to fine-tune and evaluate it.

Recipes are YAML (read with :func:`load_yaml`: ``yaml.safe_load`` plus limits on nesting depth and
on how far aliases expand) validated by the pydantic models below; every problem is reported as one
line ``file: field.path: what was expected``. ``--set a.b=value`` overrides are applied before
validation, and the resolved recipe is written next to each result.

Relative data and model paths in a recipe resolve against the current directory (as paths given
on the command line do), not against the recipe file; "not found" errors show the absolute path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from efquant_fx.errors import EfquantError, RecipeError
from efquant_fx.files import atomic_write_bytes

RECIPE_VERSION = 1
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"  # inside the package: a wheel carries them
Bits = int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(_Strict):
    """Where images come from. ``random`` is only for smoke tests (no faces involved)."""

    kind: str = Field(
        default="random", description="a registered data kind: folder, list, recordio (face images), synthetic "
        "(made from the teacher), random (noise), or one a plugin registered with register_dataset_kind",
    )
    root: str | None = None
    list: str | None = None
    idx: str | None = Field(default=None, description="RecordIO index (default: beside the .rec)")
    verify: Literal["decode", "header", "none"] | None = Field(
        default=None, description="how images are checked up front (decode = fully, the default)"
    )
    flip: bool | None = Field(default=None, description="random horizontal flip when training")
    max_images: int | None = Field(default=None, ge=1)
    max_identities: int | None = Field(default=None, ge=1)
    min_images_per_identity: int = Field(default=1, ge=1)
    n: int | None = Field(default=None, ge=1, description="number of images for synthetic/random data")
    cache: str | None = Field(default=None, description="cache folder for synthesized images")
    steps: int | None = Field(default=None, ge=1, description="optimisation steps per batch for synthetic images")
    seed: int | None = None

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, v: str) -> str:
        from pydantic_core import PydanticCustomError

        from efquant_fx.datakinds import is_dataset_kind, list_dataset_kinds  # imports the built-in kinds

        if not is_dataset_kind(v):
            kinds = [repr(k) for k in list_dataset_kinds()]
            known = f"{', '.join(kinds[:-1])} or {kinds[-1]}" if len(kinds) > 1 else "".join(kinds)
            raise PydanticCustomError("data_kind", "Input should be a registered data kind: {known}", {"known": known})
        return v

    def dataset_fields(self) -> dict[str, Any]:
        """The spec :func:`efquant_fx.data.build_data` takes (it calls ``verify`` ``validate``); ``n``,
        ``cache`` and ``steps`` only for kinds that take them."""
        from efquant_fx.datakinds import get_dataset_kind

        fields = self.model_dump(exclude_none=True, exclude={"n", "cache", "steps"} - get_dataset_kind(self.kind).keys)
        if "verify" in fields:
            fields["validate"] = fields.pop("verify")
        return fields


class ModelSpec(_Strict):
    name: str | None = Field(default=None, description="registry name, or a path to .onnx / MXNet symbol .json")
    weights: str | None = Field(default=None, description="insightface-layout backbone.pth / model.pt")
    random_weights: bool = Field(default=False, description="build a zoo model without trained weights (smoke "
                                 "tests only); otherwise a zoo name without weights is an error")
    leaf_modules: list[str] = Field(default_factory=list, description="module names/classes FX must not trace into")
    kwargs: dict[str, Any] = Field(default_factory=dict)


Role = Literal["stem", "embedding", "depthwise", "pointwise"]


class LayerRule(_Strict):
    """Per-layer override; the first rule that selects a layer wins. A rule selects by ``match`` (a regex
    searched in the module name) or by ``role`` (``stem``: the first conv/linear; ``embedding``: the last;
    ``depthwise``: convs with one group per channel; ``pointwise``: dense 1x1 convs), so one recipe
    transfers between backbones whose module names differ. A rule that selects no layer is an error."""

    match: str | None = None
    role: Role | None = None
    weight_bits: Bits | None = Field(default=None, ge=2, le=8)
    act_bits: Bits | None = Field(default=None, ge=2, le=8)
    skip: bool = Field(default=False, description="leave this layer in float")

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return v

    @model_validator(mode="after")
    def _one_selector(self) -> LayerRule:
        if (self.match is None) == (self.role is None):
            raise ValueError("give exactly one of match (a regex) or role (stem, embedding, depthwise, pointwise)")
        return self

    @property
    def selector(self) -> str:
        return f"role {self.role}" if self.role else f"'{self.match}'"


class BudgetSpec(_Strict):
    """Mixed precision by measured sensitivity (:mod:`efquant_fx.graph.budget`): layers whose weights or
    input activations matter most get ``high_bits`` until an average reaches its budget."""

    weight_bits: float | None = Field(default=None, gt=0, le=8, description="parameter-weighted average, at most")
    act_bits: float | None = Field(default=None, gt=0, le=8, description="MAC-weighted input average, at most")
    high_bits: Bits = Field(default=8, ge=2, le=8, description="the bits a raised layer gets")
    images: int = Field(default=64, ge=1, description="calibration faces the sensitivities are measured on")

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetSpec:
        if self.weight_bits is None and self.act_bits is None:
            raise ValueError("give weight_bits, act_bits or both (the averages to stay within)")
        return self


class QuantConfig(_Strict):
    enabled: bool = True
    weight_bits: Bits = Field(default=8, ge=2, le=8)
    act_bits: Bits = Field(default=8, ge=2, le=8)
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    weight_symmetric: bool = True
    act_symmetric: bool = True
    weight_estimator: Literal["minmax", "mse"] = "minmax"
    observer: Literal["minmax", "moving_average", "percentile", "mse"] = "minmax"
    percentile: float = Field(default=99.99, gt=50, le=100)
    layer_types: list[Literal["Conv2d", "Linear"]] = Field(default_factory=lambda: ["Conv2d", "Linear"])
    exclude: list[str] = Field(default_factory=list, description="regexes of module names left in float")
    layers: list[LayerRule] = Field(default_factory=list)
    act_points: list[Literal["compute_input", "compute_output", "prelu", "residual_add", "output"]] = Field(
        default_factory=lambda: ["compute_input", "prelu", "residual_add"],
        description="where activations are quantized; compute_output (after each quantized Conv2d, past "
        "its BatchNorm) is what integer kernels (QLinearConv) run, so an int8 export then matches the "
        "fake-quant model",
    )
    quantize_prelu_slopes: bool = False
    batchnorm: Literal["keep", "fold", "reestimate"] = "fold"
    budget: BudgetSpec | None = Field(
        default=None, description="raise the most sensitive layers to budget.high_bits within average-bit "
                                  "budgets; the saved recipe holds the chosen layers as quant.layers rules")

    @model_validator(mode="after")
    def _budget_reachable(self) -> QuantConfig:
        b = self.budget
        if b is not None and b.weight_bits is not None and b.weight_bits < self.weight_bits:
            raise ValueError(f"budget.weight_bits {b.weight_bits} is below quant.weight_bits {self.weight_bits}")
        if b is not None and b.act_bits is not None and b.act_bits < self.act_bits:
            raise ValueError(f"budget.act_bits {b.act_bits} is below quant.act_bits {self.act_bits}")
        return self


class CalibrationConfig(_Strict):
    images: int = Field(default=256, ge=1)
    batch_size: int = Field(default=32, ge=1)
    data: DataSpec = Field(default_factory=DataSpec)


class RoundingSpec(_Strict):
    """Learned weight rounding (AdaRound), layer by layer, on the calibration images."""

    iters: int = Field(default=200, ge=1, description="optimisation steps per layer")
    batch_size: int = Field(default=32, ge=1, description="images per step (drawn from the calibration images)")
    lr: float = Field(default=1e-2, gt=0)
    reg_weight: float = Field(default=0.01, ge=0, description="weight of the rounding regulariser")
    learn_act_scale: bool = Field(default=True, description="also learn the step of each layer's input point")


class PTQConfig(_Strict):
    """Post-training improvements, as switches (Brevitas's where it has them)."""

    cross_layer_equalization: int = Field(default=0, ge=0, description="EqualizeGraph iterations (0 = off)")
    act_equalization: float | None = Field(default=None, gt=0, le=1, description="SmoothQuant alpha")
    prelu_equalization: float | None = Field(
        default=None, gt=0, le=1,
        description="per-channel range equalization across PReLU (conv -> PReLU -> conv chains), strength "
                    "alpha for depthwise consumers (alpha/2 for dense ones): every channel uses the whole "
                    "activation grid; the float model is unchanged",
    )
    learned_rounding: RoundingSpec | None = Field(
        default=None, description="AdaRound-style learned rounding of every quantized layer's weights against "
                                  "the float model's layer outputs (the 4-bit lever); null = round to nearest")
    bias_correction: bool = False
    gptq: bool = False
    gptq_act_order: bool = True
    gptq_exclude: list[str] = Field(
        default_factory=lambda: ["^fc$"],
        description="layers GPTQ skips; the 25088-input fc needs > 9 GB for its Hessian",
    )


class PruneConfig(_Strict):
    kind: Literal["none", "unstructured", "channels"] = "none"
    sparsity: float = Field(default=0.3, gt=0, lt=1)
    exclude: list[str] = Field(default_factory=list)


class LossTerm(_Strict):
    weight: float = Field(default=1.0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class FinetuneConfig(_Strict):
    data: DataSpec = Field(default_factory=DataSpec)
    steps: int = Field(default=300, ge=1)
    identities_per_batch: int = Field(default=16, ge=1)
    images_per_identity: int = Field(default=4, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    step_milestones: list[int] = Field(default_factory=list)
    clip_grad_norm: float | None = Field(default=5.0, gt=0)
    losses: dict[str, LossTerm] = Field(default_factory=lambda: {"kd_mse": LossTerm(), "ekd": LossTerm()})
    calibrate_steps: int = Field(default=0, ge=0, description="steps with activation observers on, then frozen")
    batchnorm: Literal["teacher", "reestimate"] = "teacher"
    amp: bool = True
    channels_last: bool = True
    fused_fake_quant: bool = Field(
        default=True, description="train through fused fake-quant ops (same grid and gradients, about half "
                                  "the step time on CPU); off: Brevitas's own forward")
    eval_every: int = Field(default=0, ge=0, description="evaluate every N steps (0: only at step 0, the PTQ "
                            "model, and at the end); the best evaluated weights are kept")
    checkpoint_every: int = Field(default=50, ge=1)
    max_bad_steps: int = Field(default=5, ge=0)


ExportFormat = Literal["onnx_qcdq", "onnx_float", "packed", "torch_int8"]  # efquant_fx.export.FORMATS


class ExportConfig(_Strict):
    """Deployable files ``apply`` writes to ``<run>/export/``; also ``efquant-fx export``'s defaults."""

    # the fields are export_model()'s keyword arguments: pipeline.run_recipe passes model_dump()

    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["onnx_qcdq", "packed", "torch_int8"], min_length=1,
        description="onnx_qcdq (int8 ONNX), onnx_float (the teacher), packed (sub-8-bit weights), "
                    "torch_int8 (8-bit models only; skipped otherwise)",
    )
    opset: int = Field(default=13, ge=13, description="ONNX opset (per-channel DequantizeLinear needs 13)")
    int8_kernels: bool = Field(
        default=True, description="onnx_qcdq: calibrated 8-bit requantization points after quantized layers, "
                                  "so onnxruntime runs QLinearConv/QLinearAdd (off: exact graph, float convs)")
    requantize_linear: bool = Field(
        default=False, description="onnx_qcdq: also round the embedding (Linear output) to 8 bits (QGemm)")
    check_images: int = Field(default=16, ge=1, description="images for the parity checks (last calibration batch)")


class Recipe(_Strict):
    version: Literal[1] = RECIPE_VERSION
    name: str = "recipe"
    description: str = ""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec = Field(default_factory=ModelSpec)
    quant: QuantConfig | None = None
    prune: PruneConfig | None = None
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    ptq: PTQConfig = Field(default_factory=PTQConfig)
    finetune: FinetuneConfig | None = None
    eval: list[dict[str, Any]] = Field(default_factory=list)
    export: ExportConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write the resolved recipe atomically (temp file + rename; see :func:`atomic_write_bytes`)."""

        return atomic_write_bytes(Path(path), self.to_yaml().encode("utf-8"))


def shared_root() -> Path:
    """``$EFQUANT_SHARED`` or ``../shared`` (benchmarks and real-data tests read data from here)."""
    return Path(os.environ.get("EFQUANT_SHARED", "../shared"))


def _expand(value: Any) -> Any:
    """Expand ``${EFQUANT_SHARED}`` and other env vars in string fields."""
    if isinstance(value, str) and "$" in value:
        env = dict(os.environ)
        env.setdefault("EFQUANT_SHARED", str(shared_root()))
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


#: a recipe is a few levels of sections; deeper nesting (after aliases are expanded) is refused
YAML_MAX_DEPTH = 50
#: how large aliases may make a recipe: nodes plus scalar characters, counted with every alias expanded
YAML_MAX_EXPANDED = 100_000


class YAMLLimitError(yaml.YAMLError):
    """A YAML document that is nested too deeply, refers to itself or expands too far through aliases.

    Not a syntax error: refused on purpose, before anything is built from it (a "billion laughs"
    document of a few hundred bytes would otherwise expand to gigabytes when the recipe is walked).
    """

    def __init__(self, problem: str, mark: yaml.Mark | None = None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark

    def where(self) -> str:
        mark = self.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that limits nesting depth and the size aliases expand to."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0
        self._first_alias: tuple[str, yaml.Mark] | None = None

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if self._first_alias is None:
                self._first_alias = (event.anchor, event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= YAML_MAX_DEPTH:  # the composer recurses: stop before Python's stack does
            raise YAMLLimitError(f"nested more than {YAML_MAX_DEPTH} levels deep (a recipe is a few levels of "
                                 "sections)", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if self._first_alias is not None:
            _check_expansion(node, *self._first_alias)
        return node


def _check_expansion(root: yaml.Node, alias: str, mark: yaml.Mark) -> None:
    """Refuse a node graph that is cyclic, or too deep or too large once its aliases are expanded.

    Sizes are memoized per node, so this is linear in the composed (unexpanded) document.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    active: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise YAMLLimitError(f"an alias refers to a node that contains it (*{alias} or another); "
                                 "a recipe cannot be recursive", mark)
        if key not in sizes:
            if depth > YAML_MAX_DEPTH:
                raise YAMLLimitError(f"aliases (*{alias}, ...) nest the recipe more than {YAML_MAX_DEPTH} "
                                     "levels deep", mark)
            active.add(key)
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            else:
                children = []
            size, height = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0), 0
            for child in children:
                child_size, child_height = walk(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > YAML_MAX_EXPANDED:
                    raise YAMLLimitError(f"aliases (*{alias}, ...) expand the recipe to more than "
                                         f"{YAML_MAX_EXPANDED:,} values and characters (an alias bomb?); "
                                         "write the repeated values out", mark)
            active.discard(key)
            sizes[key] = (size, height)
        size, height = sizes[key]
        if depth + height > YAML_MAX_DEPTH:
            raise YAMLLimitError(f"aliases (*{alias}, ...) nest the recipe more than {YAML_MAX_DEPTH} "
                                 "levels deep", mark)
        return size, height

    walk(root, 0)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` for recipes and ``--set`` values, refusing documents nested more than
    :data:`YAML_MAX_DEPTH` levels, recursive ones, and ones whose aliases expand past
    :data:`YAML_MAX_EXPANDED` (raises :class:`YAMLLimitError`, a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    return f"a value ({value!r})" if len(repr(value)) <= 40 else f"a value ({type(value).__name__})"


def _set_path(data: dict[str, Any], parts: list[str], value: Any) -> str | None:
    """Set ``data[parts[0]][parts[1]]...`` (list items by index), creating missing or null mappings on
    the way. Returns why it cannot be done, or None when it was done."""
    node: Any = data
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "<root>"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not re.fullmatch(r"[0-9]+", part) or int(part) >= len(node):
                span = f"by index 0 to {len(node) - 1}" if node else "by index, but it is empty"
                return f"{here} is {_describe(node)}: address its items {span}, not {part!r}"
            slot: Any = int(part)
            nxt = node[slot]
        elif isinstance(node, dict):
            slot, nxt = part, node.get(part)
        else:
            return f"{here} is {_describe(node)}, not a mapping"
        if last:
            node[slot] = value
        else:
            if nxt is None:  # a missing or null section: create it
                nxt = node[slot] = {}
            node = nxt
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists (``4``, ``true``, ``[a, b]``).

    List items are addressed by index (``eval.0.path=...``). A path that runs into a value, past the
    end of a list or into a list by name is one :class:`RecipeError` line naming the override.
    """
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{source}: {item!r}: expected key.path=value")
            continue
        parts = key.split(".")
        if any(not p.strip() for p in parts):
            problems.append(f"{source}: {key}: empty part in the key path (expected a.b.c=value)")
            continue
        try:
            value = load_yaml(raw) if raw.strip() else None
        except YAMLLimitError as exc:
            problems.append(f"{source}: {key}: value refused: {exc.problem}")
            continue
        except yaml.YAMLError:
            value = raw
        problem = _set_path(data, parts, value)
        if problem:
            problems.append(f"{source}: {key}: {problem}")
    if problems:
        raise RecipeError(problems)
    return data


def _loc_part(part: str | int) -> str:
    """A key as the user can find it: quoted when it is empty, padded with spaces or unprintable."""
    if isinstance(part, str) and (not part or part != part.strip() or not part.isprintable()):
        return repr(part)
    return str(part)


def _format_errors(exc: ValidationError, source: str, overridden: list[list[str]] | None = None) -> list[str]:
    """One line per problem, naming where the bad value came from: the file, or ``--set`` when an
    override put it there (``--set calibration.images=lots`` is not the recipe file's fault)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(_loc_part(p) for p in err["loc"]) or "<root>"
        path = [str(p) for p in err["loc"]]
        came_from = "--set" if any(path[: len(ov)] == ov for ov in overridden or []) else source
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            empty = err["loc"] and err["loc"][-1] == ""
            msg = "unknown field (" + ("an empty key" if empty else "check the spelling") + \
                "; see the recipe reference)"
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{came_from}: {loc}: {msg}{shown}")
    return lines


def validate_recipe(data: dict[str, Any], source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """The validated recipe; problems in values that ``overrides`` set are reported against ``--set``."""
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: <root>: expected a mapping of recipe sections, got {type(data).__name__}"])
    try:
        return Recipe.model_validate(_expand(data))
    except ValidationError as exc:
        overridden = [[p.strip() for p in item.partition("=")[0].strip().split(".")] for item in overrides or []]
        raise RecipeError(_format_errors(exc, source, overridden)) from None


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every recipe that ships inside the package (``efquant-fx recipes list``); the
    head-to-head benchmark's rows are ``bench/NAME``."""
    return {p.relative_to(SHIPPED_RECIPES).with_suffix("").as_posix(): p
            for p in sorted(SHIPPED_RECIPES.rglob("*.yaml"))}


def resolve_recipe_path(ref: str | Path) -> Path:
    """``ref`` itself when it is a file, else the shipped recipe of that name (``mobilefacenet_w8a8``,
    ``.yaml`` optional), else ``ref`` unchanged (reading it then says it was not found).

    A file that exists always wins, so a user's own ``mobilefacenet_w8a8.yaml`` is never shadowed.
    """
    path = Path(ref)
    if path.is_file():
        return path
    return shipped_recipes().get(str(ref).removesuffix(".yaml"), path)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = resolve_recipe_path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: file not found (nor the name of a shipped recipe: efquant-fx recipes list)"])
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except YAMLLimitError as exc:
        raise RecipeError([f"{path}: {exc.where()}{exc.problem}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{path}: {where}malformed YAML ({problem})"]) from None
    except UnicodeDecodeError:
        raise RecipeError([f"{path}: not a UTF-8 text file"]) from None
    except OSError as exc:
        raise RecipeError([f"{path}: cannot read the recipe ({exc.strerror or exc})"]) from None
    return data if data is not None else {}


def load_recipe(
    recipe: str | Path | dict[str, Any] | Recipe, overrides: list[str] | None = None
) -> Recipe:
    """Load and validate a recipe from a YAML file, a dict or an existing Recipe, applying overrides."""
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        data, source = recipe.to_dict(), "<recipe>"
    elif isinstance(recipe, dict):
        data, source = recipe, "<recipe>"
    else:
        path = resolve_recipe_path(recipe)  # a shipped recipe by name: errors name its file
        data, source = read_recipe_file(path), str(path)
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError([f"{source}: <root>: expected a mapping of recipe sections"])
        data = apply_overrides(data, overrides)
    return validate_recipe(data, source, overrides)


def with_image_source(recipe: Recipe, data: str | Path, field: str = "--data") -> Recipe:
    """The recipe with calibration (and fine-tune) images read from ``data`` (a folder, or a list
    file whose paths are relative to its folder), keeping the recipe's subset settings."""
    data = Path(data)
    if data.is_dir():
        source: dict[str, Any] = {"kind": "folder", "root": str(data)}
    elif data.is_file():
        source = {"kind": "list", "list": str(data), "root": str(data.parent)}
    else:
        raise EfquantError("not found", source=str(data), field=field)
    kept = ("verify", "flip", "max_images", "max_identities", "min_images_per_identity", "seed")
    raw = recipe.to_dict()
    for section in ("calibration", "finetune"):
        if raw.get(section) is None:
            continue
        old = raw[section].get("data") or {}
        raw[section]["data"] = {**{k: old[k] for k in kept if old.get(k) is not None}, **source}
    return load_recipe(raw)
