"""Fine-tuning losses: distil a frozen FP32 teacher's embedding into the compressed student.

Every loss is a small ``nn.Module`` with the same call, ``loss(student_emb, teacher_emb, labels=None)``,
so a recipe can pick and weight them by name (:func:`build_loss`, :func:`build_combined_loss`).
The teacher embedding is always detached: the teacher is frozen, gradients flow only into the student
(and into the class centres of the optional margin head).

Names (see ``/work/shared/research/papers.md`` section 2 for where each comes from):

* ``kd_mse``     QuantFace: ``nn.MSELoss`` between L2-normalised embeddings (mean over B*d elements).
* ``kd_cosine``  mean(1 - cos(s, t)); equals ``kd_mse * d / 2``, but does not shrink with d.
* ``ekd``        EKD-style evaluation-oriented rank loss at FPR anchors (Ef-QuantFace's "evaluation-based
  metric loss", best reading); constants as in Tencent/TFace ``ekd.py``.
* ``relational`` MSE between the student's and teacher's in-batch cosine-similarity matrices.
* ``margin``     ArcFace/CosFace margin softmax on the student embedding, with its own learnable
  class centres (only when the data has identity labels; add its parameters to the optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efquant_fx.errors import EfquantError

__all__ = [
    "LOSSES",
    "CombinedLoss",
    "EKDLoss",
    "KDCosineLoss",
    "KDMSELoss",
    "MarginSoftmaxLoss",
    "RelationalLoss",
    "build_combined_loss",
    "build_loss",
    "list_losses",
]


def _check_pair(student_emb: Tensor, teacher_emb: Tensor) -> None:
    """Shapes must agree: distillation compares the two embeddings element by element."""
    if student_emb.dim() != 2 or student_emb.shape != teacher_emb.shape:
        raise EfquantError(
            f"student embedding {tuple(student_emb.shape)} and teacher embedding "
            f"{tuple(teacher_emb.shape)} must both be [batch, dim] with the same dim",
            field="loss",
        )


def _normalised_pair(student_emb: Tensor, teacher_emb: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair(student_emb, teacher_emb)
    s = F.normalize(student_emb, dim=1)
    t = F.normalize(teacher_emb.detach().to(s.dtype), dim=1)
    return s, t


class KDMSELoss(nn.Module):
    """QuantFace's KD loss: MSE(normalize(s), normalize(t)), mean over all B*d elements."""

    requires_labels = False

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor | None = None) -> Tensor:
        s, t = _normalised_pair(student_emb, teacher_emb)
        return F.mse_loss(s, t)


class KDCosineLoss(nn.Module):
    """mean_i(1 - cos(s_i, t_i)): the same direction as ``kd_mse`` with a dimension-free scale."""

    requires_labels = False

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor | None = None) -> Tensor:
        s, t = _normalised_pair(student_emb, teacher_emb)
        return (1.0 - (s * t).sum(dim=1)).mean()


class RelationalLoss(nn.Module):
    """MSE between student and teacher cosine-similarity matrices over the B*(B-1) off-diagonal pairs.

    Keeps the geometry between faces (what verification scores use) rather than each embedding.
    A batch of one has no pairs and gives 0 (still attached to the graph).
    """

    requires_labels = False

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor | None = None) -> Tensor:
        s, t = _normalised_pair(student_emb, teacher_emb)
        b = s.shape[0]
        off = ~torch.eye(b, dtype=torch.bool, device=s.device)
        if b < 2:
            return (s * 0.0).sum()
        return F.mse_loss((s @ s.T)[off], (t @ t.T)[off])


_DEFAULT_ANCHORS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)


class EKDLoss(nn.Module):
    """Evaluation-oriented KD (EKD, Huang et al. CVPR 2022), as in Tencent/TFace ``ekd.py``.

    For in-batch pairs i<j (positives: same label), the thresholds at FPR 1/a for each anchor a are
    the negatives' similarities (sorted descending) at index floor(|N|/a), for the student and the
    teacher separately. They are EMA buffers (momentum 0.01, start at 0, updated under no_grad and only
    in ``train()`` mode, so they checkpoint and a validation pass does not move them). A pair's soft
    rank count is r = sum_k sigmoid((sim - theta_k)/tau) (exponent clamped to +-50); the loss is
    ``w_pos * MSE(r_S, r_T)`` over positive pairs + ``w_neg * MSE(r_S, r_T)`` over the ``top_k``
    negatives with the highest student similarity (same pairs for the teacher).

    Without labels, or with a batch that has no positive pair, only the negative term is used (all
    pairs count as negatives when ``labels`` is None). A batch with no negative pair leaves the
    thresholds unchanged. EKD all-gathers embeddings across GPUs; under DDP gather them before the call
    if the per-GPU batch is small.
    """

    requires_labels = False

    def __init__(
        self,
        anchors: Sequence[float] = _DEFAULT_ANCHORS,
        momentum: float = 0.01,
        tau: float = 0.01,
        w_pos: float = 0.02,
        w_neg: float = 0.01,
        top_k: int = 2000,
        clamp: float = 50.0,
    ):
        super().__init__()
        anchors = tuple(float(a) for a in anchors)
        if not anchors or any(a <= 1.0 for a in anchors):
            raise EfquantError(
                f"anchors must be > 1 (FPR = 1/anchor < 1), got {list(anchors)}", field="anchors"
            )
        if not 0.0 < momentum <= 1.0:
            raise EfquantError(f"momentum must be in (0, 1], got {momentum}", field="momentum")
        if tau <= 0:
            raise EfquantError(f"tau must be > 0, got {tau}", field="tau")
        if int(top_k) < 1:
            raise EfquantError(f"top_k must be >= 1, got {top_k}", field="top_k")
        self.anchors = anchors
        self.momentum = float(momentum)
        self.tau = float(tau)
        self.w_pos = float(w_pos)
        self.w_neg = float(w_neg)
        self.top_k = int(top_k)
        self.clamp = float(clamp)
        self.register_buffer("s_thresholds", torch.zeros(len(anchors)))
        self.register_buffer("t_thresholds", torch.zeros(len(anchors)))

    def extra_repr(self) -> str:
        return (
            f"anchors={list(self.anchors)}, momentum={self.momentum}, tau={self.tau}, "
            f"w_pos={self.w_pos}, w_neg={self.w_neg}, top_k={self.top_k}"
        )

    def rank_count(self, sim: Tensor, thresholds: Tensor) -> Tensor:
        """Differentiable count of the thresholds each similarity passes: shape [n]."""
        exponent = (-(sim.unsqueeze(1) - thresholds.unsqueeze(0)) / self.tau).clamp(-self.clamp, self.clamp)
        return (1.0 / (1.0 + torch.exp(exponent))).sum(dim=1)

    @torch.no_grad()
    def _update_thresholds(self, s_neg: Tensor, t_neg: Tensor) -> None:
        n = s_neg.numel()
        index = torch.tensor([math.floor(n / a) for a in self.anchors], device=s_neg.device)
        s_new = torch.sort(s_neg.detach(), descending=True).values[index]
        t_new = torch.sort(t_neg.detach(), descending=True).values[index]
        m = self.momentum
        self.s_thresholds.mul_(1.0 - m).add_(m * s_new.to(self.s_thresholds.dtype))
        self.t_thresholds.mul_(1.0 - m).add_(m * t_new.to(self.t_thresholds.dtype))

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor | None = None) -> Tensor:
        s, t = _normalised_pair(student_emb, teacher_emb)
        b = s.shape[0]
        i, j = torch.triu_indices(b, b, offset=1, device=s.device)
        sim_s = (s[i] * s[j]).sum(dim=1)
        with torch.no_grad():
            sim_t = (t[i] * t[j]).sum(dim=1)
        if labels is None:
            pos = torch.zeros_like(sim_s, dtype=torch.bool)
        else:
            labels = labels.reshape(-1).to(s.device)
            if labels.numel() != b:
                raise EfquantError(f"{labels.numel()} labels for a batch of {b}", field="labels")
            pos = labels[i] == labels[j]
        neg = ~pos
        s_neg, t_neg = sim_s[neg], sim_t[neg]
        if self.training and s_neg.numel() > 0:
            self._update_thresholds(s_neg, t_neg)
        th_s = self.s_thresholds.to(s.dtype).clone()
        th_t = self.t_thresholds.to(s.dtype).clone()

        loss = (sim_s * 0.0).sum()  # zero that stays on the graph when a term is empty
        if bool(pos.any()):
            loss = loss + self.w_pos * F.mse_loss(
                self.rank_count(sim_s[pos], th_s), self.rank_count(sim_t[pos], th_t)
            )
        if s_neg.numel() > 0:
            hardest = torch.argsort(s_neg.detach(), descending=True)[: self.top_k]
            loss = loss + self.w_neg * F.mse_loss(
                self.rank_count(s_neg[hardest], th_s), self.rank_count(t_neg[hardest], th_t)
            )
        return loss


class MarginSoftmaxLoss(nn.Module):
    """ArcFace (cos(theta+m)) or CosFace (cos(theta)-m) softmax on the student embedding, scale ``s``.

    Has its own class centres (``weight``: num_classes x embedding_size, init N(0, 0.01) as in
    arcface_torch's Partial FC), because zoo checkpoints ship only the backbone. ArcFace uses the
    differentiable textbook form with the usual fallback cos(theta) - m*sin(m) when theta + m > pi.
    The teacher embedding is ignored.
    """

    requires_labels = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int = 512,
        kind: str = "arcface",
        s: float = 64.0,
        m: float | None = None,
    ):
        super().__init__()
        if kind not in ("arcface", "cosface"):
            raise EfquantError(f"kind must be 'arcface' or 'cosface', got {kind!r}", field="kind")
        if int(num_classes) < 2:
            raise EfquantError(f"num_classes must be >= 2, got {num_classes}", field="num_classes")
        self.kind = kind
        self.num_classes = int(num_classes)
        self.s = float(s)
        self.m = float(m if m is not None else (0.5 if kind == "arcface" else 0.35))
        self.weight = nn.Parameter(torch.empty(self.num_classes, int(embedding_size)).normal_(0.0, 0.01))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_classes={self.num_classes}, s={self.s}, m={self.m}"

    def forward(
        self, student_emb: Tensor, teacher_emb: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        if labels is None:
            raise EfquantError("the margin loss needs identity labels; this data has none", field="loss")
        labels = labels.reshape(-1).to(student_emb.device).long()
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise EfquantError(
                f"label {int(bad[0])} out of range for num_classes={self.num_classes}", field="num_classes"
            )
        cos = F.linear(F.normalize(student_emb, dim=1), F.normalize(self.weight.to(student_emb.dtype), dim=1))
        cos = cos.clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        if self.kind == "cosface":
            new_target = target - self.m
        else:
            sin = (1.0 - target * target).clamp_min(1e-12).sqrt()
            phi = target * math.cos(self.m) - sin * math.sin(self.m)
            new_target = torch.where(
                target > math.cos(math.pi - self.m), phi, target - self.m * math.sin(self.m)
            )
        logits = cos.scatter(1, labels[:, None], new_target) * self.s
        return F.cross_entropy(logits, labels)


LossFactory = Callable[..., nn.Module]

LOSSES: dict[str, LossFactory] = {
    "kd_mse": KDMSELoss,
    "kd_cosine": KDCosineLoss,
    "ekd": EKDLoss,
    "relational": RelationalLoss,
    "margin": MarginSoftmaxLoss,
}
"""Name -> factory. Add an entry to make a new loss selectable from recipes."""


def list_losses() -> list[str]:
    """Names accepted by :func:`build_loss`, sorted."""
    return sorted(LOSSES)


def build_loss(name: str, *, source: str | None = None, **kwargs: Any) -> nn.Module:
    """Create the loss registered as ``name``; bad names or arguments raise one-line EfquantErrors."""
    if name not in LOSSES:
        raise EfquantError(
            f"unknown loss {name!r}; known: {', '.join(list_losses())}", source=source, field="loss"
        )
    try:
        return LOSSES[name](**kwargs)
    except TypeError as exc:
        raise EfquantError(
            f"bad arguments for loss {name!r}: {exc}", source=source, field=f"loss.{name}"
        ) from None
    except EfquantError as exc:
        raise EfquantError(str(exc), source=source, field=f"loss.{name}") from None


class CombinedLoss(nn.Module):
    """Weighted sum of named losses; returns (total, {name: unweighted value, ..., "total": value}).

    Terms with weight 0 are skipped (not computed). Its ``parameters()`` include any learnable term
    (the margin head's class centres), so pass them to the optimizer too.
    """

    def __init__(self, terms: Mapping[str, tuple[nn.Module, float]]):
        super().__init__()
        if not terms:
            raise EfquantError("at least one loss term is needed", field="loss")
        self.terms = nn.ModuleDict({name: module for name, (module, _) in terms.items()})
        self.weights = {name: float(weight) for name, (_, weight) in terms.items()}

    @property
    def requires_labels(self) -> bool:
        return any(
            getattr(m, "requires_labels", False) and self.weights[n] != 0.0 for n, m in self.terms.items()
        )

    def forward(
        self, student_emb: Tensor, teacher_emb: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        total: Tensor | None = None
        logs: dict[str, float] = {}
        for name, module in self.terms.items():
            weight = self.weights[name]
            if weight == 0.0:
                continue
            value = module(student_emb, teacher_emb, labels)
            logs[name] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        if total is None:
            total = (student_emb * 0.0).sum()
        logs["total"] = float(total.detach())
        return total, logs


def build_combined_loss(spec: Mapping[str, Any], *, source: str | None = None) -> CombinedLoss:
    """Build from a recipe mapping ``{name: {weight: w, **kwargs}}`` (or ``{name: w}``).

    Example: ``{"kd_mse": 1.0, "ekd": {"weight": 1.0, "top_k": 2000}}``.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise EfquantError(
            "expected a mapping of loss name -> weight or settings", source=source, field="loss"
        )
    terms: dict[str, tuple[nn.Module, float]] = {}
    for name, settings in spec.items():
        if isinstance(settings, (int, float)) and not isinstance(settings, bool):
            kwargs: dict[str, Any] = {}
            weight = float(settings)
        elif isinstance(settings, Mapping):
            kwargs = dict(settings)
            weight = kwargs.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise EfquantError(
                    f"weight must be a number, got {weight!r}", source=source, field=f"loss.{name}"
                )
        else:
            raise EfquantError(
                f"expected a weight or a mapping, got {settings!r}", source=source, field=f"loss.{name}"
            )
        terms[str(name)] = (build_loss(str(name), source=source, **kwargs), float(weight))
    return CombinedLoss(terms)
