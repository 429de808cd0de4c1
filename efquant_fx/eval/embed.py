"""Batched embedding extraction with flip test and a feature cache keyed by model and data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.eval.cache import FeatureCache, as_cache, cache_key
from efquant_fx.eval.images import ImageSet
from efquant_fx.eval.progress import progress_bar
from efquant_fx.graph.frozen import frozen_quantizers

_EMBED_VERSION = "efquant-embed-v1"


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the model's class name and every ``state_dict`` entry (name, dtype, shape, bytes).

    Two models with equal weights and class hash equal, whatever object they are; for an FX
    ``GraphModule`` the generated code is hashed too, since its class name says nothing, and so are
    quantizer bit widths (Brevitas keeps them outside the state dict).
    """
    h = hashlib.sha256()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    code = getattr(model, "code", None)
    if isinstance(code, str):
        h.update(code.encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if t.is_quantized:
                h.update(f"q{t.qscheme()}".encode())
                if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                    h.update(f"{t.q_scale()},{t.q_zero_point()}".encode())
                else:
                    h.update(t.q_per_channel_scales().numpy().tobytes())
                    h.update(t.q_per_channel_zero_points().numpy().tobytes())
                t = t.int_repr()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            t = t.contiguous().reshape(-1)
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    for name, bits in _bit_widths(model):  # quantizers of equal weights and scales may differ only here
        h.update(f"{name}:{bits}".encode())
    return h.hexdigest()


def _bit_widths(model: nn.Module) -> list[tuple[str, float]]:
    """(module name, bit width) of every quantizer exposing ``bit_width()`` (Brevitas proxies)."""
    found = []
    for name, module in model.named_modules():
        bit_width = getattr(module, "bit_width", None)
        if not callable(bit_width):
            continue
        try:
            value = bit_width()
        except Exception:  # a proxy without a quantizer (e.g. an unused input quant)
            continue
        if value is not None:
            found.append((name, float(value)))
    return found


def preprocess(pixels: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` scaled ``(x - 127.5) / 127.5``."""
    # np.array copies: the pixels may be a read-only memory map from the cache
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).float()
    return (x - 127.5) / 127.5


def _forward(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    out = model(x)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EfquantError(
            f"the model returned {shape}; expected embeddings of shape [{x.shape[0]}, D]", field="model"
        )
    return out.detach().float().cpu().numpy()


def extract_embeddings(
    model: nn.Module,
    images: ImageSet,
    *,
    flip: bool = True,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    cache: FeatureCache | str | Path | None = None,
    progress: bool | None = None,
    description: str = "embedding",
) -> np.ndarray:
    """Raw embeddings as float32 ``[N, V, D]``: ``V = 2`` (original, horizontally flipped) or 1.

    Each distinct image (same bytes, same landmarks) is run once. Results are cached under
    (model hash, image-set fingerprint, flip) when ``cache`` is given; the model runs in ``eval()``
    mode under ``no_grad`` on ``device`` (it is moved there) and its training flag is restored; a
    fake-quant model runs with its quantizers frozen (:mod:`efquant_fx.graph.frozen`, same numbers).
    """
    if batch_size < 1:
        raise EfquantError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    store = as_cache(cache)
    key = (
        cache_key("features", _EMBED_VERSION, model_hash(model), images.fingerprint, int(flip))
        if store
        else ""
    )
    if store is not None:
        hit = store.load("features", key)
        if hit is not None and hit.ndim == 3 and hit.shape[:2] == (len(images), 2 if flip else 1):
            return hit.astype(np.float32, copy=False)
    pixels = images.pixels(cache=store, progress=progress)  # distinct images only
    _, inverse = images.unique()
    dev = torch.device(device)
    was_training = model.training
    model.to(dev).eval()
    chunks: list[np.ndarray] = []
    try:
        # fake-quant models run with their quantizers frozen: Brevitas's numbers without its per-call work
        with torch.no_grad(), frozen_quantizers(model), progress_bar(len(pixels), description, progress) as advance:
            for start in range(0, len(pixels), batch_size):
                x = preprocess(pixels[start : start + batch_size]).to(dev)
                views = [_forward(model, x)]
                if flip:
                    views.append(_forward(model, torch.flip(x, dims=[3])))
                chunks.append(np.stack(views, axis=1))
                advance(x.shape[0])
    finally:
        model.train(was_training)
    if not chunks:
        raise EfquantError("no images to embed", field="images")
    feats = np.concatenate(chunks, axis=0).astype(np.float32, copy=False)[inverse]
    if store is not None:
        store.save("features", key, feats)
    return feats


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), like ``sklearn.preprocessing.normalize``."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def xnorm(features: np.ndarray) -> float:
    """insightface's XNorm: mean L2 norm of all raw embeddings (every view); a drift indicator."""
    return float(np.linalg.norm(np.asarray(features, dtype=np.float64), axis=-1).mean())
