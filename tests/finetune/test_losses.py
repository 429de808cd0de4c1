"""Loss values on hand-computed cases, gradients, the registry and the combined loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efquant_fx.errors import EfquantError
from efquant_fx.finetune.losses import (
    CombinedLoss,
    EKDLoss,
    build_combined_loss,
    build_loss,
    list_losses,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- values


def test_kd_mse_value_by_hand():
    # s = [3,4] -> [0.6, 0.8]; t = [1,0]; squared diffs 0.16 + 0.64, mean over B*d = 2 -> 0.4
    loss = build_loss("kd_mse")(t([[3.0, 4.0]]), t([[2.0, 0.0]]))
    assert loss.item() == pytest.approx(0.4)
    # two rows: the second identical -> (0.16 + 0.64 + 0 + 0) / 4
    loss = build_loss("kd_mse")(t([[3.0, 4.0], [0.0, 5.0]]), t([[1.0, 0.0], [0.0, 1.0]]))
    assert loss.item() == pytest.approx(0.2)


def test_kd_mse_equals_scaled_cosine():
    g = torch.Generator().manual_seed(0)
    s, te = (
        torch.randn(5, 8, generator=g, dtype=torch.float64),
        torch.randn(5, 8, generator=g, dtype=torch.float64),
    )
    mse = build_loss("kd_mse")(s, te)
    cos = build_loss("kd_cosine")(s, te)
    assert mse.item() == pytest.approx(2.0 / 8 * cos.item())


def test_kd_cosine_value_by_hand():
    # cos([3,4],[1,0]) = 0.6 ; cos([1,1],[-1,-1]) = -1 -> mean(0.4, 2.0) = 1.2
    loss = build_loss("kd_cosine")(t([[3.0, 4.0], [1.0, 1.0]]), t([[1.0, 0.0], [-1.0, -1.0]]))
    assert loss.item() == pytest.approx(1.2)


def test_relational_value_by_hand():
    # student sims: s01=0, s02=s12=1/sqrt2 ; teacher: t01=1, t02=t12=0
    # off-diagonal squared diffs (each twice): 1, 0.5, 0.5 -> 4/6
    s = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    te = t([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert build_loss("relational")(s, te).item() == pytest.approx(4.0 / 6.0)
    assert build_loss("relational")(s[:1], te[:1]).item() == 0.0


def _ekd_reference(s, te, labels, th_s, th_t, tau, w_pos, w_neg, top_k):
    """Plain numpy re-statement of the EKD formula for a tiny batch."""
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    te = te / np.linalg.norm(te, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s))]

    def rank(sim, th):
        return sum(1.0 / (1.0 + math.exp(np.clip(-(sim - x) / tau, -50, 50))) for x in th)

    pos = [(i, j) for i, j in pairs if labels[i] == labels[j]]
    neg = [(i, j) for i, j in pairs if labels[i] != labels[j]]
    neg = sorted(neg, key=lambda p: -float(s[p[0]] @ s[p[1]]))[:top_k]

    def mse(ps):
        return np.mean([(rank(s[i] @ s[j], th_s) - rank(te[i] @ te[j], th_t)) ** 2 for i, j in ps])

    return w_pos * (mse(pos) if pos else 0.0) + w_neg * mse(neg)


def test_ekd_value_and_threshold_by_hand():
    s = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    te = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-0.6, 0.8]])
    labels = [0, 0, 1, 1]
    # negatives (i<j, different labels): (0,2),(0,3),(1,2),(1,3)
    # student sims 0.6, 0.0, 0.96, 0.6 -> sorted desc [0.96, 0.6, 0.6, 0.0]
    # teacher sims 0.8, -0.6, 0.96, 0.28 -> sorted desc [0.96, 0.8, 0.28, -0.6]
    # anchor 2 -> index floor(4/2)=2: student 0.6, teacher 0.28; anchor 4 -> index 1: 0.6, 0.8
    loss_fn = EKDLoss(anchors=(2, 4), momentum=1.0, tau=0.1, w_pos=0.5, w_neg=0.25, top_k=3)
    loss = loss_fn(t(s), t(te), torch.tensor(labels))
    assert loss_fn.s_thresholds.tolist() == pytest.approx([0.6, 0.6])
    assert loss_fn.t_thresholds.tolist() == pytest.approx([0.28, 0.8])
    expected = _ekd_reference(s, te, labels, [0.6, 0.6], [0.28, 0.8], 0.1, 0.5, 0.25, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ekd_defaults_and_ema_update():
    loss_fn = build_loss("ekd")
    assert loss_fn.anchors == (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
    got = (loss_fn.tau, loss_fn.momentum, loss_fn.w_pos, loss_fn.w_neg, loss_fn.top_k)
    assert got == (0.01, 0.01, 0.02, 0.01, 2000)
    s = t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # 3 pairs, all negatives without labels; fewer than every anchor -> index 0 = hardest (0.8)
    loss_fn(s, s.clone())
    assert loss_fn.s_thresholds.tolist() == pytest.approx([0.008] * 6)
    loss_fn(s, s.clone())
    assert loss_fn.s_thresholds.tolist() == pytest.approx([0.008 * 0.99 + 0.008] * 6)
    # eval mode: thresholds frozen; they are buffers, so they checkpoint
    loss_fn.eval()
    loss_fn(s, s.clone())
    assert loss_fn.s_thresholds.tolist() == pytest.approx([0.008 * 0.99 + 0.008] * 6)
    assert set(loss_fn.state_dict()) == {"s_thresholds", "t_thresholds"}


def test_ekd_degrades_without_positives_or_labels():
    g = torch.Generator().manual_seed(1)
    s, te = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    no_pos = EKDLoss(momentum=1.0)(s, te, torch.arange(6))
    no_labels = EKDLoss(momentum=1.0)(s, te, None)
    assert torch.isfinite(no_pos) and no_pos.item() == pytest.approx(no_labels.item())
    # all one identity: no negatives -> thresholds untouched, positive term only
    loss_fn = EKDLoss()
    value = loss_fn(s, te, torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(value) and loss_fn.s_thresholds.abs().sum() == 0
    assert EKDLoss()(s[:1], te[:1], torch.zeros(1)).item() == 0.0
    with pytest.raises(EfquantError, match="labels"):
        EKDLoss()(s, te, torch.zeros(5))


def test_margin_cosface_and_arcface_by_hand():
    head = build_loss("margin", num_classes=2, embedding_size=2, kind="cosface", s=1.0)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    # cos = [1, 0]; target 1 - 0.35 -> CE = log(1 + e^{-0.65})
    assert head(torch.tensor([[2.0, 0.0]]), None, torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-0.65)), rel=1e-5
    )
    arc = build_loss("margin", num_classes=2, embedding_size=2, s=2.0)
    assert arc.m == 0.5 and head.m == 0.35
    with torch.no_grad():
        arc.weight.copy_(torch.eye(2))
    a = math.radians(30)
    emb = torch.tensor([[math.cos(a), math.sin(a)]])
    target, other = 2.0 * math.cos(a + 0.5), 2.0 * math.sin(a)
    expected = -target + math.log(math.exp(target) + math.exp(other))
    assert arc(emb, None, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(EfquantError, match="labels"):
        arc(emb, emb, None)
    with pytest.raises(EfquantError, match="num_classes"):
        arc(emb, emb, torch.tensor([2]))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["kd_mse", "kd_cosine", "relational", "ekd"])
def test_gradients_flow_to_student_only(name):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 4, generator=g)
    kwargs = {"tau": 0.5, "momentum": 1.0} if name == "ekd" else {}
    s = (base + 0.3 * torch.randn(6, 4, generator=g)).requires_grad_()
    te = base.clone().requires_grad_()
    loss = build_loss(name, **kwargs)(s, te, torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert te.grad is None or te.grad.abs().sum() == 0


def test_margin_gradients_reach_student_and_centres():
    head = build_loss("margin", num_classes=3, embedding_size=4)
    s = torch.randn(5, 4, requires_grad=True)
    head(s, s.detach(), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["kd_mse", "kd_cosine", "relational"])
def test_gradcheck_double(name):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    te = torch.randn(4, 3, generator=g, dtype=torch.float64)
    fn = build_loss(name)
    assert torch.autograd.gradcheck(lambda x: fn(x, te), (s,))


def test_gradcheck_ekd_frozen_thresholds():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    te = torch.randn(5, 3, generator=g, dtype=torch.float64)
    fn = EKDLoss(anchors=(2, 5), tau=0.5, momentum=1.0)
    fn(s.detach(), te)  # set thresholds, then freeze them so forward is a pure function
    fn.eval()
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda x: fn(x, te, labels), (s,))


# ---------------------------------------------------------------- registry and combination


def test_registry_and_errors():
    assert list_losses() == ["ekd", "kd_cosine", "kd_mse", "margin", "relational"]
    with pytest.raises(EfquantError, match="unknown loss 'nope'"):
        build_loss("nope")
    with pytest.raises(EfquantError, match="loss.ekd"):
        build_loss("ekd", not_an_arg=1)
    with pytest.raises(EfquantError, match="anchors"):
        build_loss("ekd", anchors=[1.0])
    with pytest.raises(EfquantError, match="same dim"):
        build_loss("kd_mse")(torch.ones(2, 3), torch.ones(2, 4))


def test_combined_loss_total_and_logs():
    s, te = t([[3.0, 4.0]]), t([[1.0, 0.0]])
    combo = CombinedLoss({"kd_mse": (build_loss("kd_mse"), 2.0), "kd_cosine": (build_loss("kd_cosine"), 0.5)})
    total, logs = combo(s, te)
    assert logs["kd_mse"] == pytest.approx(0.4) and logs["kd_cosine"] == pytest.approx(0.4)
    assert total.item() == pytest.approx(2.0 * 0.4 + 0.5 * 0.4)
    assert logs["total"] == pytest.approx(total.item())
    built = build_combined_loss(
        {"kd_mse": 1.0, "ekd": {"weight": 0.0}, "margin": {"num_classes": 3, "weight": 0}}
    )
    total, logs = built(s, te)
    assert set(logs) == {"kd_mse", "total"} and not built.requires_labels
    with pytest.raises(EfquantError, match="loss.ekd"):
        build_combined_loss({"ekd": {"weight": "heavy"}})
