"""Packed sub-8-bit weights on disk, and the loader that rebuilds the compressed graph from them.

The file is a deflate-compressed ``.npz`` (numpy arrays only, read with ``allow_pickle=False``: no
pickled code; the 4-bit codes of a trained network are peaked enough that deflate takes another
~15 % off, and zip's per-entry overhead is most of what is left on small networks):

- ``meta``: UTF-8 JSON (format version, resolved recipe, model reference, per-layer bit widths,
  activation ranges);
- ``packed/<layer>``: the integer weight codes of every quantized Conv2d/Linear, bit-packed at the
  layer's own width (:mod:`efquant_fx.export.bitpack`); ``scale/<layer>``, ``zero_point/<layer>``;
- ``tensor/<key>``: every other state-dict tensor as-is (biases, BatchNorms, PReLU slopes,
  activation-quantizer scales and zero points).

Loading rebuilds the graph *structure* by replaying the data-free steps of ``compress()`` (trace,
pruning, BN folding, quantizer insertion) on the float model — no calibration, GPTQ or
fine-tuning is rerun — then loads the dequantized weights. Brevitas re-derives each weight scale
from those weights (min-max statistics land on the same grid) or loads it (learned/MSE scales),
and the loader checks that every restored integer weight equals the stored one.
"""

from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from efquant_fx.export.files import atomic_path
from efquant_fx.export.reports import PackedReport
from efquant_fx.graph.modules import ActQuant
from efquant_fx.graph.report import float_size_bytes
from efquant_fx.graph.state import fit_to_state
from efquant_fx.recipe import Recipe, load_recipe

FORMAT = "efquant-packed"
VERSION = 1

ModelSource = nn.Module | Callable[[], nn.Module] | str | Path | Any | None


def _quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}


@torch.no_grad()
def integer_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """(integer codes, scale, zero point, bits, signed) of a Brevitas layer's quantized weight."""
    qt = layer.quant_weight()
    scale, zero_point = qt.scale.detach().float().cpu(), qt.zero_point.detach().float().cpu()
    # what QuantTensor.int() computes, without its (slow, full-tensor) validity check
    ints = torch.round(qt.value.detach().float().cpu() / scale + zero_point).to(torch.int16)
    return ints, scale, zero_point, int(qt.bit_width), bool(qt.signed)


def save_packed(result_or_model: Any, path: str | Path, *, recipe: Recipe | None = None,
                fp32_bytes: int | None = None) -> PackedReport:
    """Write the compressed model at ``path`` (``.npz``) with weights packed at their bit widths.

    ``result_or_model`` is a :class:`~efquant_fx.CompressionResult` (recipe and fp32 size taken
    from it) or a compressed GraphModule plus ``recipe``.
    """
    model = getattr(result_or_model, "model", result_or_model)
    recipe = recipe or getattr(result_or_model, "recipe", None)
    if recipe is None:
        raise EfquantError("save_packed needs the recipe (pass a CompressionResult or recipe=)", field="export")
    if fp32_bytes is None:
        teacher = getattr(result_or_model, "teacher", None)
        fp32_bytes = float_size_bytes(teacher) if teacher is not None else float_size_bytes(model)
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    layers_meta, bits_hist = [], {}
    packed_bytes = float_bytes = 0
    skip: set[str] = set()
    for name, layer in _quant_layers(model).items():
        ints, scale, zero_point, bits, signed = integer_weight(layer)
        offset = 1 << (bits - 1) if signed else 0
        codes = (ints + offset).numpy()
        if codes.min() < 0 or codes.max() >= 1 << bits:
            raise RuntimeError(f"{name}: integer weights outside {bits}-bit range")
        arrays[f"packed/{name}"] = pack_bits(codes.astype(np.uint8), bits)
        arrays[f"scale/{name}"] = scale.numpy().astype(np.float32)
        arrays[f"zero_point/{name}"] = zero_point.numpy().astype(np.float32)
        packed_bytes += arrays[f"packed/{name}"].nbytes
        layers_meta.append(dict(name=name, key=f"{name}.weight", shape=list(ints.shape), bits=bits, signed=signed))
        bits_hist[str(bits)] = bits_hist.get(str(bits), 0) + 1
        skip.add(f"{name}.weight")
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        arrays[f"tensor/{key}"] = value.detach().cpu().numpy()
        float_bytes += arrays[f"tensor/{key}"].nbytes
    points = {name: list(m.range) for name, m in model.named_modules() if isinstance(m, ActQuant) and m.range}
    meta = dict(
        format=FORMAT, version=VERSION, recipe=recipe.to_dict(), model=recipe.model.model_dump(mode="json"),
        model_class=type(getattr(result_or_model, "teacher", model)).__name__, layers=layers_meta,
        act_ranges=points, torch=torch.__version__,
    )
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would otherwise append ".npz"
            np.savez_compressed(fh, **arrays)
    return PackedReport(path=str(path), bytes=path.stat().st_size, fp32_bytes=int(fp32_bytes),
                        layers=len(layers_meta), bits=bits_hist, packed_weight_bytes=packed_bytes,
                        float_tensor_bytes=float_bytes)


MAX_INFLATION = 32  # deflate gets ~1.2x on weights; a zip bomb gets ~1000x


def _check_inflated_size(path: Path) -> None:
    """Refuse a file whose entries would inflate far past what model weights can (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise EfquantError(f"not a packed efquant model ({exc})", source=str(path)) from None
    limit = max(64 << 20, MAX_INFLATION * path.stat().st_size)
    if declared > limit:
        raise EfquantError(f"not a packed efquant model: its entries would inflate to {declared:,} bytes "
                           f"(more than {MAX_INFLATION}x the file)", source=str(path))


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The meta dict and arrays of a packed file (no pickle is ever loaded)."""
    path = Path(path)
    if not path.is_file():
        raise EfquantError("packed model file not found", source=str(path))
    _check_inflated_size(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise EfquantError(f"not a packed efquant model ({exc})", source=str(path)) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise EfquantError(f"unsupported packed format {meta.get('format')!r} v{meta.get('version')}",
                           source=str(path))
    return meta, arrays


def _float_model(source: ModelSource, meta: dict[str, Any], path: Path) -> nn.Module:
    from efquant_fx.models.loader import load_model

    teacher = getattr(source, "teacher", None)
    if teacher is not None:  # a CompressionResult
        return copy.deepcopy(teacher).cpu().eval()
    if isinstance(source, nn.Module):
        return copy.deepcopy(source).cpu().eval()
    if callable(source):
        return source().cpu().eval()
    ref = source if source is not None else meta["model"].get("name")
    if ref is None:
        raise EfquantError("the packed file does not name its model (compressed from an nn.Module); "
                           "pass the float model or a factory as model=", source=str(path))
    weights = meta["model"].get("weights") if source is None else None
    return load_model(ref, weights, **meta["model"].get("kwargs", {})).cpu().eval()


def rebuild_graph(float_model: nn.Module, recipe: Recipe) -> fx.GraphModule:
    """The compressed graph's structure without any data-dependent step (shared with ``compress()``)."""
    from efquant_fx.graph.passes import replay_passes
    from efquant_fx.graph.trace import trace

    gm, _plans = replay_passes(trace(float_model, recipe.model.leaf_modules), recipe)
    return gm.eval()


class _Pinned(nn.Module):
    """A constant weight scale or zero point, standing in for a statistics-derived one."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.clone())

    def forward(self, *args: Any) -> torch.Tensor:
        return self.value


def _pin_weight_quant(layer: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Fix a layer's weight scale/zero point to the stored values.

    Needed where statistics of the dequantized weights do not give back the stored grid: an
    asymmetric channel whose zero point was clamped (all weights one sign), for example.
    """
    tensor_quant = getattr(getattr(layer, "weight_quant", None), "tensor_quant", None)
    if tensor_quant is None or not hasattr(tensor_quant, "zero_point_impl"):
        return False
    device = layer.weight.device
    tensor_quant.scaling_impl = _Pinned(scale.to(device))
    tensor_quant.zero_point_impl = _Pinned(zero_point.to(device))
    return True


@torch.no_grad()
def load_packed(path: str | Path, model: ModelSource = None, *, verify: bool = True) -> fx.GraphModule:
    """Restore the compressed graph saved by :func:`save_packed`.

    ``model`` gives the float architecture: a CompressionResult (its teacher), a float
    ``nn.Module``, a zero-argument factory, a registry name / model file, or ``None`` to use the
    model named in the file's recipe. Returns the compressed GraphModule in eval mode.
    """
    path = Path(path)
    meta, arrays = read_packed(path)
    recipe = load_recipe(meta["recipe"])
    gm = rebuild_graph(_float_model(model, meta, path), recipe)
    state: dict[str, torch.Tensor] = {}
    expected: dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}
    for layer in meta["layers"]:
        name, bits, shape = layer["name"], layer["bits"], layer["shape"]
        codes = unpack_bits(arrays[f"packed/{name}"], bits, int(np.prod(shape))).reshape(shape)
        ints = codes.astype(np.int16) - (1 << (bits - 1) if layer["signed"] else 0)
        scale = torch.from_numpy(arrays[f"scale/{name}"])
        zero_point = torch.from_numpy(arrays[f"zero_point/{name}"])
        state[layer["key"]] = (torch.from_numpy(ints).float() - zero_point) * scale
        expected[name] = (ints, scale, zero_point)
    for key in arrays:
        if key.startswith("tensor/"):
            state[key[len("tensor/"):]] = torch.from_numpy(arrays[key])
    fit_to_state(gm, state)
    have = gm.state_dict()
    missing = sorted(set(have) - set(state))
    unexpected = sorted(set(state) - set(have))
    wrong = sorted(k for k in set(have) & set(state) if tuple(have[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if keys)
        raise EfquantError(f"the rebuilt graph does not match the packed tensors ({detail}); "
                           f"is model= the architecture that was compressed ({meta.get('model_class')})?",
                           source=str(path))
    gm.load_state_dict(state, strict=True)
    for name, rng in meta.get("act_ranges", {}).items():
        point = gm.get_submodule(name)
        if isinstance(point, ActQuant):
            point.range = (float(rng[0]), float(rng[1]))
    gm.eval()
    for name, layer in _quant_layers(gm).items():
        if name not in expected or _restored(layer, *expected[name]):
            continue
        _pin_weight_quant(layer, expected[name][1], expected[name][2])
        if verify and not _restored(layer, *expected[name]):
            raise EfquantError(f"layer {name} did not restore its quantized weights exactly", source=str(path))
    return gm


def _restored(layer: nn.Module, ints: np.ndarray, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Bit-exact: same integers, same scale and zero point (a 1-ulp scale change can flip a rounding
    somewhere downstream, and random-weight test nets amplify that)."""
    got_ints, got_scale, got_zero_point, _, _ = integer_weight(layer)
    return (np.array_equal(got_ints.numpy(), ints) and torch.equal(got_scale.reshape(scale.shape), scale)
            and torch.equal(got_zero_point.reshape(zero_point.shape), zero_point))


def packed_size_estimate(model: nn.Module) -> int:
    """Bytes the packed weights of ``model`` take (without the float tensors and the container)."""
    total = 0
    for layer in _quant_layers(model).values():
        total += packed_nbytes(layer.weight.numel(), int(layer.quant_weight().bit_width))
    return total
