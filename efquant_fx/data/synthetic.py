"""Data-free images: invert the teacher's BatchNorm statistics (ZeroQ / DeepInversion style).

Random inputs are optimised (Adam on the pixels, clamped to [-1, 1]) so that, at every BatchNorm, the
batch mean and standard deviation of the BN's input match its running statistics:
``sum_bn ||mu_b - running_mean||^2 + ||sigma_b - sqrt(running_var + eps)||^2``, plus an optional
total-variation prior (``tv_weight``, off by default). Hooks sit on the BN *modules*, so an FX
GraphModule from the ONNX/MXNet importers works as long as its BatchNorms are ``nn.BatchNorm*d``
modules (they are). A model without BatchNorm running statistics cannot be inverted: EfquantError.

The defaults are chosen for speed on CPU, where only a few optimisation steps per image are
affordable (ZeroQ uses hundreds). Two choices make those steps count:

* the pixels are optimised on a coarser grid (``resolution``), bilinearly upsampled to 112x112 for the
  network: same network cost, but a smoother, better-conditioned problem that lowers the BN loss
  faster per step. The price is images without pixel-level detail;
* Adam with a high, cosine-decayed learning rate and low betas.

More ``steps`` keep lowering the loss at linear cost. Running the network itself at a lower resolution
does not work: statistics at another scale barely transfer.

The images are cached as uint8 pixels (what a real image pipeline gives) in
``<cache>/synthetic-<key>.pt``, keyed by the teacher's weights hash, ``n``, ``seed``, ``steps`` and
the other settings, written atomically and read back with ``weights_only=True``.

Synthetic images have no identities: :class:`SyntheticDataset` gives every image its own label, so
the EKD loss sees no positive pairs and uses its negative (impostor-ranking) term only. We do not add
flipped copies as positives: a face and its mirror have teacher similarity near 1, above every FPR
threshold for teacher and student alike, so that term would carry almost no signal while costing
half of each batch. Random training flips still apply.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efquant_fx.data.base import InMemoryFaceDataset, sample_seed
from efquant_fx.data.report import DataReport
from efquant_fx.datakinds import BuildContext, register_dataset_kind
from efquant_fx.errors import EfquantError
from efquant_fx.logs import ProgressLog

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS",
    "DEFAULT_N",
    "BNStatLoss",
    "SyntheticDataset",
    "bn_statistics_loss",
    "synthesize",
    "synthetic_dataset",
    "weights_hash",
]

IMAGE_SIZE = 112
DEFAULTS: dict[str, Any] = dict(steps=6, batch_size=64, lr=0.07, tv_weight=0.0, resolution=56)
"""Settings chosen for speed on CPU (module docstring); ``steps`` is also the recipe's ``data.steps``."""
DEFAULT_N = 512
"""Images synthesized for fine-tuning when ``data.n`` is not set (calibration makes ``calibration.images``)."""
_VERSION = "bn-inversion-v1"
_BN = nn.modules.batchnorm._BatchNorm


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of every state_dict entry (name, dtype, shape, bytes): the cache key's model part."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorms that carry running statistics (the only ones inversion can use)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


class BNStatLoss:
    """Forward pre-hooks on every BatchNorm; :meth:`run` returns the summed statistics mismatch."""

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise EfquantError(
                "data-free synthesis inverts BatchNorm running statistics, and this teacher has no BatchNorm "
                "layer with running statistics (folded or absent); use real face images "
                "(data.kind: list, folder or recordio)",
                field="data.kind",
            )
        self.terms: list[Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._hook) for _, m in self.layers]

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        std = (x.var(dim=dims, unbiased=False) + module.eps).sqrt()
        target_std = (module.running_var.float() + module.eps).sqrt()
        self.terms.append((mean - module.running_mean.float()).pow(2).sum() + (std - target_std).pow(2).sum())

    def run(self, model: nn.Module, x: Tensor) -> Tensor:
        """Forward ``x`` through ``model`` and return the BN loss of this batch."""
        self.terms = []
        model(x)
        terms, self.terms = self.terms, []
        if not terms:
            raise EfquantError("no BatchNorm ran in the forward pass, so there are no statistics to match",
                               field="data.kind")
        return torch.stack(terms).sum()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels (a smoothness prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _init_images(n: int, generator: torch.Generator) -> Tensor:
    """Smooth noise (a coarse 7x7 field plus fine noise): starts closer to image statistics than white noise."""
    coarse = torch.randn(n, 3, 7, 7, generator=generator) * 0.5
    fine = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 0.2
    x = F.interpolate(coarse, size=IMAGE_SIZE, mode="bilinear", align_corners=False) + fine
    return x.clamp(-1, 1)


def synthesize_batch(
    model: nn.Module,
    hooks: BNStatLoss,
    n: int,
    *,
    generator: torch.Generator,
    steps: int,
    lr: float,
    tv_weight: float,
    resolution: int = IMAGE_SIZE,
    device: torch.device,
    on_step: Callable[[], None] = lambda: None,
) -> tuple[Tensor, float]:
    """Optimise one batch of ``n`` images on a ``resolution``-sized pixel grid (upsampled to 112 for
    the network); returns (images in [-1, 1], BN loss at the last step)."""

    def full(z: Tensor) -> Tensor:
        return z if resolution == IMAGE_SIZE else F.interpolate(z, size=IMAGE_SIZE, mode="bilinear",
                                                               align_corners=False)

    z = _init_images(n, generator)
    if resolution != IMAGE_SIZE:
        z = F.interpolate(z, size=resolution, mode="bilinear", align_corners=False, antialias=True)
    z = z.to(device).requires_grad_()
    opt = torch.optim.Adam([z], lr=lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.1)
    value = float("nan")
    for _ in range(steps):
        x = full(z)
        flip = bool(torch.rand((), generator=generator) < 0.5)  # jitter: the statistics should be flip-invariant
        loss = hooks.run(model, x.flip(-1) if flip else x)
        value = float(loss.detach())
        if tv_weight:
            loss = loss + tv_weight * total_variation(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            z.clamp_(-1.0, 1.0)
        on_step()
    with torch.no_grad():
        return full(z).clamp(-1.0, 1.0), value


@contextmanager
def _progress(total: int, description: str, enabled: bool | None) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``; a rich bar on an interactive terminal (unless ``enabled`` is False), else
    log lines every few seconds (a piped or logged synthesis takes minutes, and must not be silent)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if enabled is False or not console.is_terminal:
        lines = ProgressLog(description, total, "step")
        yield lambda: lines.advance()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task, 1)


def cache_key(teacher_hash: str, n: int, seed: int, settings: Mapping[str, Any]) -> str:
    text = f"{_VERSION}|{teacher_hash}|n={n}|seed={seed}|" + "|".join(f"{k}={settings[k]}" for k in sorted(settings))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def synthesize(
    teacher: nn.Module,
    n: int,
    *,
    seed: int = 0,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    tv_weight: float = DEFAULTS["tv_weight"],
    resolution: int = DEFAULTS["resolution"],
    cache: str | Path | None = None,
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` images ``[n, 3, 112, 112]`` in [-1, 1] synthesized from ``teacher``'s BN statistics.

    Deterministic for given (teacher weights, n, seed, settings); with ``cache`` the images are read
    from / written to ``<cache>/synthetic-<key>.pt``. The teacher is left as it was (mode, grads).
    """
    if n < 1:
        raise EfquantError(f"must be >= 1, got {n}", field="data.n")
    if steps < 1:
        raise EfquantError(f"must be >= 1, got {steps}", field="data.steps")
    if batch_size < 1 or lr <= 0 or tv_weight < 0 or not 8 <= resolution <= IMAGE_SIZE:
        raise EfquantError(f"bad settings batch_size={batch_size}, lr={lr}, tv_weight={tv_weight}, "
                           f"resolution={resolution}", field="data")
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, tv_weight=tv_weight, resolution=resolution)
    hooks = BNStatLoss(teacher)  # fails early, before hashing, on a model without BN
    path = None
    try:
        if cache is not None:
            path = Path(cache).expanduser() / f"synthetic-{cache_key(weights_hash(teacher), n, seed, settings)}.pt"
            cached = _read_cache(path, n)
            if cached is not None:
                return cached
        pixels = _run(teacher, hooks, n, seed, settings, progress, device)
    finally:
        hooks.close()
    if path is not None:
        try:  # a per-process temp name: several ranks may write the same (identical) file at once
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({"pixels": pixels, "settings": settings, "n": n, "seed": seed}, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise EfquantError(f"cannot write the synthetic-image cache: {exc.strerror or exc}",
                               source=str(path), field="data.cache") from None
    return _from_pixels(pixels)


def _read_cache(path: Path, n: int) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        pixels = torch.load(path, map_location="cpu", weights_only=True)["pixels"]
    except Exception as exc:  # a damaged cache file is rebuilt, never trusted
        log.warning("ignoring unreadable synthetic-image cache %s (%s)", path, exc)
        return None
    if tuple(pixels.shape) != (n, 3, IMAGE_SIZE, IMAGE_SIZE) or pixels.dtype != torch.uint8:
        log.warning("ignoring synthetic-image cache %s with unexpected contents", path)
        return None
    log.info("synthetic images read from %s", path)
    return _from_pixels(pixels)


def _run(teacher: nn.Module, hooks: BNStatLoss, n: int, seed: int, settings: dict[str, Any],
         progress: bool | None, device: torch.device | str | None) -> Tensor:
    device = torch.device(device) if device is not None else _model_device(teacher)
    batch_size, steps = settings["batch_size"], settings["steps"]
    was_training = teacher.training
    grads = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.eval()
    for p, _ in grads:
        p.requires_grad_(False)  # only the input is optimised: skips every weight gradient
    batches = []
    try:
        with _progress(math.ceil(n / batch_size) * steps, f"synthesizing {n} images", progress) as advance:
            for b, start in enumerate(range(0, n, batch_size)):
                g = torch.Generator().manual_seed(sample_seed(seed, 0, b))
                images, final = synthesize_batch(
                    teacher, hooks, min(batch_size, n - start), generator=g, steps=steps, lr=settings["lr"],
                    tv_weight=settings["tv_weight"], resolution=settings["resolution"], device=device,
                    on_step=advance,
                )
                log.info("synthetic batch %d: BN loss %.4g", b, final)
                batches.append(_to_pixels(images.cpu()))
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        teacher.train(was_training)
    return torch.cat(batches)


@torch.no_grad()
def bn_statistics_loss(teacher: nn.Module, images: Tensor) -> float:
    """The BN-matching loss of ``images`` under ``teacher`` (lower = closer to its training data)."""
    hooks = BNStatLoss(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        return float(hooks.run(teacher, images.to(_model_device(teacher))))
    finally:
        hooks.close()
        teacher.train(was_training)


def _to_pixels(x: Tensor) -> Tensor:
    return (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def _from_pixels(p: Tensor) -> Tensor:
    return (p.float() - 127.5) / 127.5


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class SyntheticDataset(InMemoryFaceDataset):
    """In-memory images, one label per image (no identities); seeded random flips when training."""

    def __init__(self, images: Tensor, *, train: bool = True, seed: int = 0, source: str = "synthetic"):
        n = int(images.shape[0])
        report = DataReport(source=source, kind="synthetic", listed=n, selected=n, loaded=n, identities=n)
        report.notes.append("synthetic images have no identities (one label per image): EKD uses negative pairs only")
        super().__init__(images, report, seed=seed)
        self.flip = train

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index]
        if self.flip:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            if bool(torch.rand((), generator=g) < 0.5):
                x = x.flip(-1)
        return x, self.labels[index]


def synthetic_dataset(spec: Mapping[str, Any], teacher: nn.Module | None, *, n_default: int, seed: int,
                      train: bool = True, progress: bool | None = None,
                      prefix: str = "data") -> tuple[SyntheticDataset, DataReport]:
    """Build ``{kind: synthetic, n, cache, seed, steps}`` from the teacher (recipe entry point)."""
    if teacher is None:
        raise EfquantError("kind 'synthetic' needs the teacher model to synthesize images from",
                           field=f"{prefix}.kind")
    n = int(spec.get("n") or n_default)
    steps = int(spec.get("steps") or DEFAULTS["steps"])
    seed = int(spec["seed"]) if spec.get("seed") is not None else seed
    if n < 1:
        raise EfquantError(f"must be >= 1, got {n}", field=f"{prefix}.n")
    if not batchnorm_layers(teacher):
        raise EfquantError(
            "data-free synthesis inverts BatchNorm running statistics, and this teacher has no BatchNorm layer "
            "with running statistics; use real face images (kind: list, folder or recordio)", field=f"{prefix}.kind"
        )
    images = synthesize(teacher, n, seed=seed, steps=steps, cache=spec.get("cache"), progress=progress)
    dataset = SyntheticDataset(images, train=train, seed=seed,
                               source=f"synthetic(n={n}, seed={seed}, cache={spec.get('cache')})")
    return dataset, dataset.report


@register_dataset_kind("synthetic", keys=("n", "cache", "steps"), generated=True, needs_teacher=True,
                       identities=False, default_n=DEFAULT_N)
def _synthetic(spec: dict[str, Any], ctx: BuildContext) -> SyntheticDataset:
    dataset, _report = synthetic_dataset(spec, ctx.teacher, n_default=ctx.n or DEFAULT_N, seed=ctx.seed,
                                         train=ctx.train, progress=ctx.progress, prefix=ctx.prefix)
    return dataset
