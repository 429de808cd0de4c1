"""The fine-tune loop on a tiny conv net: resume, NaN guard, signals, BN policy, calibration, DDP."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from efquant_fx import EfquantError, compress
from efquant_fx.finetune import finetune, lr_factor
from efquant_fx.graph.modules import ActQuant
from efquant_fx.recipe import FinetuneConfig, load_recipe
from tests.conftest import REPO, face_batch
from tests.finetune.tiny import TinyFaceNet

BASE = {"device": "cpu", "quant": {"weight_bits": 4, "act_bits": 4},
        "calibration": {"images": 16, "batch_size": 8}}


def ft(**kw) -> dict:
    spec = {"steps": 6, "identities_per_batch": 2, "images_per_identity": 2, "lr": 0.05, "checkpoint_every": 3,
            "data": {"kind": "random", "n": 32}}
    spec.update(kw)
    return spec


@pytest.fixture(scope="module")
def ptq():
    """A W4A4 tiny net after PTQ (no fine-tune), to copy for each run."""
    return compress(TinyFaceNet(), BASE)


def run(ptq, finetune_spec: dict, quant: dict | None = None, **kwargs):
    result = copy.deepcopy(ptq)
    recipe = {**BASE, "finetune": finetune_spec}
    if quant:
        recipe["quant"] = {**BASE["quant"], **quant}
    result.recipe = load_recipe(recipe)
    return finetune(result, progress=False, **kwargs)


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_compress_with_finetune_section_fills_history(tmp_path):
    result = compress(TinyFaceNet(), {**BASE, "finetune": ft()}, finetune_dir=tmp_path)
    train = [h for h in result.history if h["kind"] == "train"]
    assert [h["step"] for h in train] == list(range(1, 7))
    assert {"lr", "loss", "kd_mse", "ekd", "images_per_s", "grad_norm"} <= set(train[0])
    assert result.timings["finetune"] > 0 and not result.model.training
    assert (tmp_path / "last.pt").is_file()
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and "terms.ekd.s_thresholds" in ckpt["loss"]


def test_compress_never_returns_a_student_worse_than_its_ptq(tmp_path):
    """compress() scores PTQ (step 0) and the end on its held-out calibration batch and keeps the better."""
    result = compress(TinyFaceNet(), {**BASE, "finetune": ft(lr=5.0)}, finetune_dir=tmp_path)  # a harmful lr
    evals = [h for h in result.history if h["kind"] == "eval"]
    assert [h["step"] for h in evals] == [0, 6]
    assert evals[0]["cosine_mean"] == pytest.approx(result.ptq_fidelity["cosine_mean"], abs=1e-5)
    assert result.fidelity["cosine_mean"] >= result.ptq_fidelity["cosine_mean"] - 1e-5
    assert any("held-out calibration batch" in n for n in result.notes)


def test_ekd_thresholds_start_from_the_first_batch(ptq, tmp_path):
    run(ptq, ft(steps=1), out_dir=tmp_path)
    loss_state = torch.load(tmp_path / "last.pt", weights_only=True)["loss"]
    # set from the batch (momentum 1 on the first step), not 0.01 * batch value as from a zero start
    assert loss_state["terms.ekd.t_thresholds"].abs().max() > 0.05


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(ptq, tmp_path):
    full = run(ptq, ft(), out_dir=tmp_path / "a")
    first = run(ptq, ft(), out_dir=tmp_path / "b", stop_at=3)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    assert any("stop_at=3" in n for n in first.notes)
    resumed = run(ptq, ft(), out_dir=tmp_path / "b", resume=True)
    assert max_diff(full.model.state_dict(), resumed.model.state_dict()) < 1e-6
    trained = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]  # before the best is restored
    assert max_diff(trained, ptq.model.state_dict()) > 1e-4  # it did train
    losses = lambda r: [h["loss"] for h in r.history if h["kind"] == "train"]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)


def test_resume_during_activation_calibration(ptq, tmp_path):
    spec = ft(calibrate_steps=4)
    full = run(ptq, spec, out_dir=tmp_path / "a")
    run(ptq, spec, out_dir=tmp_path / "b", stop_at=2)  # checkpoint while observers are on
    resumed = run(ptq, spec, out_dir=tmp_path / "b", resume=True)
    assert max_diff(full.model.state_dict(), resumed.model.state_dict()) < 1e-6


def test_resume_with_another_recipe_is_refused(ptq, tmp_path):
    run(ptq, ft(), out_dir=tmp_path, stop_at=2)
    with pytest.raises(EfquantError, match="different recipe"):
        run(ptq, ft(lr=0.01), out_dir=tmp_path, resume=True)


def test_calibrate_steps_observe_then_freeze_new_ranges(ptq):
    before = {n: m.range for n, m in ptq.model.named_modules() if isinstance(m, ActQuant)}
    result = run(ptq, ft(steps=3, calibrate_steps=2, lr=1e-4))
    points = {n: m for n, m in result.model.named_modules() if isinstance(m, ActQuant)}
    assert all(m.mode == "quant" and m.observer is None for m in points.values())
    assert any(points[n].range != before[n] for n in points)  # observed afresh on fine-tune data
    kept = run(ptq, ft(steps=2, calibrate_steps=0, lr=1e-4))
    assert {n: m.range for n, m in kept.model.named_modules() if isinstance(m, ActQuant)} == before


def test_calibrate_steps_beyond_the_run_still_freeze(ptq):
    result = run(ptq, ft(steps=2, calibrate_steps=5, lr=1e-4))
    assert all(m.mode == "quant" for m in result.model.modules() if isinstance(m, ActQuant))
    assert any("while observing" in n for n in result.notes)


@pytest.mark.parametrize("policy", ["teacher", "reestimate"])
def test_batchnorm_policy(policy):
    keep = compress(TinyFaceNet(), {**BASE, "quant": {**BASE["quant"], "batchnorm": "keep"}})
    stats = lambda m: torch.cat([b.running_mean for b in m.modules() if isinstance(b, nn.BatchNorm2d)])  # noqa: E731
    result = run(keep, ft(steps=2, batchnorm=policy), quant={"batchnorm": "keep"})
    moved = not torch.equal(stats(result.model), stats(keep.model))
    assert moved == (policy == "reestimate")


class NaNAfter(nn.Module):
    """The teacher, but its embeddings turn NaN from the ``start``-th call (for ``length`` calls)."""

    def __init__(self, inner: nn.Module, start: int, length: int = 10**9):
        super().__init__()
        self.inner, self.start, self.length, self.calls = inner, start, length, 0

    def forward(self, x):
        self.calls += 1
        y = self.inner(x)
        bad = self.start <= self.calls < self.start + self.length
        return y * float("nan") if bad else y


def test_nan_steps_are_skipped_then_the_run_stops(ptq, tmp_path):
    result = copy.deepcopy(ptq)
    result.teacher = NaNAfter(result.teacher, start=5)
    result.recipe = load_recipe({**BASE, "finetune": ft(steps=20, checkpoint_every=2, max_bad_steps=3)})
    with pytest.raises(EfquantError, match=r"NaN/inf for 3 steps in a row.*Last good checkpoint: .*step 4"):
        finetune(result, out_dir=tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    # the bad steps changed nothing: the student still has the step-4 weights
    assert max_diff(ckpt["model"], result.model.state_dict()) == 0.0
    skipped = [h["step"] for h in result.history if h.get("skipped")]
    assert skipped == [5, 6, 7]


def test_a_transient_nan_is_skipped_and_counted(ptq):
    result = copy.deepcopy(ptq)
    result.teacher = NaNAfter(result.teacher, start=2, length=1)
    result.recipe = load_recipe({**BASE, "finetune": ft(steps=4, max_bad_steps=3)})
    finetune(result, progress=False)
    assert [h["skipped"] for h in result.history if h["kind"] == "train"] == [False, True, False, False]
    assert any("skipped 1 step" in n for n in result.notes)
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point())


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: in full clean-clone runs the
    handler inherited at this point did not raise (DID NOT RAISE), though no test or library call
    we checked changes it; what is re-delivered to it is what this file tests."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_sigint_writes_a_checkpoint_then_interrupts(ptq, tmp_path, python_sigint):
    before = signal.getsignal(signal.SIGINT)
    calls = []

    def interrupt(model):  # evaluations run at steps 0 and 2; interrupt at step 2
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # synchronous: os.kill may land on a torch worker thread
        return {"score": 0.0}

    result = copy.deepcopy(ptq)
    result.recipe = load_recipe({**BASE, "finetune": ft(steps=10, eval_every=2, checkpoint_every=100)})
    with pytest.raises(KeyboardInterrupt):  # re-delivered once the checkpoint is safe
        finetune(result, out_dir=tmp_path, evaluator=interrupt, progress=False)
    assert signal.getsignal(signal.SIGINT) is before
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2  # stopped right after step 2
    assert result.history[-1] == {"kind": "stopped", "step": 2, "reason": "SIGINT"}


def test_sigterm_goes_to_the_callers_handler(ptq, tmp_path):
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        calls: list[int] = []

        def terminate(model):  # evaluations at steps 0 and 3; terminate at step 3
            calls.append(1)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGTERM)
            return {"score": 0.0}

        result = run(ptq, ft(steps=10, eval_every=3), out_dir=tmp_path, evaluator=terminate)
        assert got == [signal.SIGTERM]  # delivered once, after the loop stopped
        assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
        assert any("stopped by SIGTERM at step 3" in n for n in result.notes)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_unwritable_out_dir_fails_before_training(ptq, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = copy.deepcopy(ptq)
    result.recipe = load_recipe({**BASE, "finetune": ft()})
    with pytest.raises(EfquantError, match="cannot write fine-tune checkpoints") as info:
        finetune(result, out_dir=blocker / "run", progress=False)
    assert str(blocker / "run") in str(info.value)
    assert result.history == []


def test_disk_too_small_for_checkpoints_fails_before_training(ptq, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    result = copy.deepcopy(ptq)
    result.recipe = load_recipe({**BASE, "finetune": ft()})
    with pytest.raises(EfquantError, match=r"out_dir: only 0.0 MiB free, fine-tune checkpoints need about"):
        finetune(result, out_dir=tmp_path, progress=False)
    assert result.history == [] and not (tmp_path / "last.pt").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(ptq, tmp_path, monkeypatch):
    """ENOSPC in the middle of writing step 6's checkpoint: one clear error, step 3's last.pt intact."""
    import errno

    real_save = torch.save
    saves = []

    def save(obj, f, *args, **kwargs):
        saves.append(str(f))
        if len(saves) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")  # the disk fills up mid-write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    result = copy.deepcopy(ptq)
    result.recipe = load_recipe({**BASE, "finetune": ft(steps=6, checkpoint_every=3)})
    with pytest.raises(EfquantError, match=r"last.pt: cannot write the fine-tune checkpoint \(No space left on "
                                           r"device\); the previous last.pt \(step 3\) is intact") as info:
        finetune(result, out_dir=tmp_path, progress=False)
    assert "resume" in str(info.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the partial temp file is gone
    # and the run continues from it once there is space again
    resumed = run(ptq, ft(steps=6, checkpoint_every=3), out_dir=tmp_path, resume=True)
    assert [h["step"] for h in resumed.history if h["kind"] == "train"] == list(range(1, 7))


class OOMAt(nn.Module):
    """The teacher, but its ``at``-th forward fails as a full GPU does."""

    def __init__(self, inner: nn.Module, at: int):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.11 GiB of which 1.06 GiB is free.")
        return self.inner(x)


def test_out_of_memory_suggests_a_smaller_batch(ptq, tmp_path):
    result = copy.deepcopy(ptq)
    result.teacher = OOMAt(result.teacher, at=3)  # one teacher forward per step: step 3
    result.recipe = load_recipe({**BASE, "finetune": ft(steps=6, checkpoint_every=2)})
    with pytest.raises(EfquantError) as info:
        finetune(result, out_dir=tmp_path, progress=False)
    message = str(info.value)
    assert message.startswith("finetune.identities_per_batch: out of memory on cpu at step 3 with a batch of "
                              "2 x 2 = 4 images per process (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "lower finetune.identities_per_batch or finetune.images_per_identity" in message
    assert f"last checkpoint: {tmp_path / 'last.pt'} (step 2)" in message
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("content, message", [
    (b"\x00garbage\xff" * 8, r"refused to load: the fine-tune checkpoint is not a plain torch weights file"),
    ("code", r"refused to load: the fine-tune checkpoint would run code when unpickled.*GLOBAL posix.system"),
    ({"format": "efquant-finetune-v1", "step": 3}, r"incomplete fine-tune checkpoint \(no bad_total, batch_in_epoch"),
    ({"model": {}}, r"not an efquant fine-tune checkpoint"),
])
def test_resume_from_a_bad_checkpoint_is_one_clear_error(ptq, tmp_path, content, message):
    path = tmp_path / "last.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "code":
        class RunsCode:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        torch.save({"format": "efquant-finetune-v1", "model": RunsCode()}, path)
    else:
        torch.save(content, path)
    with pytest.raises(EfquantError, match=message) as info:
        run(ptq, ft(), out_dir=tmp_path, resume=True)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never advise loading it unsafely


def test_best_checkpoint_is_kept_and_restored(ptq, tmp_path):
    scores = iter([0.5, 0.9, 0.1, 0.2])  # evaluations at steps 0, 2, 4, 6

    def evaluator(model):
        return {"score": next(scores)}

    result = run(ptq, ft(eval_every=2), out_dir=tmp_path, evaluator=evaluator)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == 2 and best["metric"] == "score"
    assert max_diff(best["model"], result.model.state_dict()) == 0.0
    assert [h["step"] for h in result.history if h["kind"] == "eval"] == [0, 2, 4, 6]
    assert any("best evaluated weights, step 2" in n for n in result.notes)


def test_default_evaluator_reports_cosine(ptq):
    result = run(ptq, ft(steps=2, eval_every=2, lr=1e-4))
    rows = [h for h in result.history if h["kind"] == "eval"]
    assert [r["step"] for r in rows] == [0, 2] and 0 < rows[0]["cosine_mean"] <= 1


def test_adamw_step_schedule_and_margin_loss(ptq):
    spec = ft(steps=3, optimizer="adamw", lr=1e-3, schedule="step", step_milestones=[2],
              losses={"kd_cosine": {"weight": 1.0}, "margin": {"weight": 0.1, "options": {"kind": "cosface"}}})
    result = run(ptq, spec)
    lrs = [h["lr"] for h in result.history if h["kind"] == "train"]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4])
    assert "margin" in result.history[0]


def test_too_few_identities_is_a_recipe_error(ptq):
    with pytest.raises(EfquantError, match="finetune.identities_per_batch.*distinct identities"):
        run(ptq, ft(identities_per_batch=64, data={"kind": "random", "n": 16}))


def test_lr_schedules():
    cfg = FinetuneConfig(steps=10, warmup_steps=2, schedule="cosine")
    f = [lr_factor(s, cfg) for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False)) and f[-1] > 0
    step = FinetuneConfig(steps=10, schedule="step", step_milestones=[3, 6])
    assert [lr_factor(s, step) for s in (0, 3, 6)] == pytest.approx([1, 0.1, 0.01])
    assert lr_factor(7, FinetuneConfig(schedule="constant")) == 1.0


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    recipe = {**BASE, "seed": 0, "finetune": ft(steps=3, calibrate_steps=1)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "efquant_fx.ddp", json.dumps(recipe), "--model", "tests.finetune.tiny:tiny",
           "--out", str(tmp_path / "run"), "--save-final", str(tmp_path / "final-{rank}.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "final-0.pt", weights_only=True)
    b = torch.load(tmp_path / "final-1.pt", weights_only=True)
    assert max_diff(a, b) == 0.0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3
    assert (tmp_path / "run" / "model.pt").is_file()


def test_finetune_improves_the_tiny_student():
    """Fast stand-in for the r18 test below: the loop must actually move the student toward the teacher."""
    torch.manual_seed(0)
    x = face_batch(8, seed=7)
    spec = {**BASE, "calibration": {"images": 16, "batch_size": 8}}
    ptq_only = compress(TinyFaceNet(), spec, calibration_data=torch.cat([face_batch(8, seed=3), x]))
    tuned = compress(TinyFaceNet(), {**spec, "finetune": ft(steps=20, lr=0.05, losses={"kd_cosine": {}},
                                                            data={"kind": "random", "n": 64})},
                     calibration_data=torch.cat([face_batch(8, seed=3), x]))
    assert tuned.fidelity["cosine_mean"] > ptq_only.fidelity["cosine_mean"] + 0.005


@pytest.mark.slow
def test_w4a4_r18_finetune_beats_ptq_on_held_out_cosine():
    """Issue acceptance: W4A4 arcface_r18 (random weights, BN statistics from a batch), 20 steps on
    random data, improves the held-out teacher-student cosine over PTQ alone (~2 min on 2 busy cores)."""
    from efquant_fx import create_model
    from efquant_fx.graph.ptq import reestimate_batchnorm

    torch.manual_seed(0)
    model = create_model("arcface_r18")
    reestimate_batchnorm(model, [face_batch(8, seed=1)])
    spec = {"device": "cpu", "seed": 0, "quant": {"weight_bits": 4, "act_bits": 4},
            "calibration": {"images": 16, "batch_size": 8}}
    ptq_only = compress(model, spec)
    tuned = compress(model, {**spec, "finetune": {
        "steps": 20, "identities_per_batch": 4, "images_per_identity": 2, "lr": 0.05,
        "losses": {"kd_cosine": {"weight": 1.0}}, "data": {"kind": "random", "n": 64}}})
    assert tuned.fidelity["images"] == ptq_only.fidelity["images"] == 8  # the same held-out batch
    assert tuned.fidelity["cosine_mean"] > ptq_only.fidelity["cosine_mean"] + 0.02
