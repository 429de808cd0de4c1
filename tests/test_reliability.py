"""Issue 8 acceptance: a fine-tune killed by SIGTERM resumes to the same weights; hostile image files.

The SIGTERM test runs real processes: an uninterrupted fine-tune, one that receives SIGTERM halfway
(it writes a checkpoint and dies of the signal), and a ``resume=True`` run of the same recipe in a
fresh process. To make "halfway" exact without timing, the interrupted run's evaluator (a public
hook, called after every step here) waits at step 6 until the test has sent the signal.
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efquant_fx.errors import EfquantError
from tests.conftest import REPO

BASE = {"device": "cpu", "seed": 3, "quant": {"weight_bits": 4, "act_bits": 4},
        "calibration": {"images": 16, "batch_size": 8}}
# 8 batches of 2x2 per epoch: 12 steps cross an epoch boundary; regular checkpoints at 4, 8, 12
FINETUNE = {"steps": 12, "identities_per_batch": 2, "images_per_identity": 2, "lr": 0.05, "checkpoint_every": 4,
            "eval_every": 1, "data": {"kind": "random", "n": 32}}
SIGNAL_AT = 6
WAIT_LIMIT_S = 120  # generous: only bounds a broken run, never decides a pass


def child(out: str, final: str, resume: bool, gate: str | None) -> None:
    """One fine-tune process: PTQ of the tiny net, then ``finetune`` into ``out``; saves the final weights."""
    from efquant_fx import compress
    from efquant_fx.finetune import finetune
    from efquant_fx.recipe import load_recipe
    from efquant_fx.result import atomic_torch_save
    from tests.finetune.tiny import TinyFaceNet

    torch.set_num_threads(1)
    result = compress(TinyFaceNet(), BASE)
    result.recipe = load_recipe({**BASE, "finetune": FINETUNE})
    calls: list[int] = []

    def evaluator(model):  # called at step 0, then after every step
        calls.append(1)
        if gate is not None and len(calls) == SIGNAL_AT + 1:
            Path(gate, "waiting").touch()
            deadline = time.monotonic() + WAIT_LIMIT_S
            while not Path(gate, "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return {}  # no metric: nothing to select, the final weights are the last step's

    finetune(result, out_dir=out, resume=resume, evaluator=evaluator, progress=False)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    atomic_torch_save({"model": result.model.state_dict(), "losses": torch.tensor(losses)}, final)


def start(out: Path, final: Path, resume: bool = False, gate: Path | None = None) -> subprocess.Popen:
    """The child in a fresh interpreter; its stderr goes to ``<final>.log`` (no pipe to fill up)."""
    code = (f"from tests.test_reliability import child; "
            f"child({str(out)!r}, {str(final)!r}, {resume!r}, {str(gate) if gate else None!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(final.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=log)
    proc.log = final.with_suffix(".log")  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        proc.wait(timeout=WAIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"fine-tune process hung:\n{proc.log.read_text()[-3000:]}")  # type: ignore[attr-defined]
    return proc.returncode, proc.log.read_text()  # type: ignore[attr-defined]


@pytest.fixture
def started():
    """Processes this test started; any still running when it ends (a failed assertion) are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_halfway_then_resume_matches_an_uninterrupted_run(tmp_path, started):
    gate = tmp_path / "gate"
    gate.mkdir()
    uninterrupted = start(tmp_path / "full", tmp_path / "full.pt")  # alongside: independent directories
    proc = start(tmp_path / "cut", tmp_path / "cut.pt", gate=gate)
    started += [uninterrupted, proc]
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not (gate / "waiting").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run never reached step {SIGNAL_AT}:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    (gate / "go").touch()
    rc, err = finish(proc)
    # the step ends, the checkpoint is written, then the signal is re-delivered: the process dies of it
    assert rc == -signal.SIGTERM, err[-3000:]
    assert "SIGTERM received: finishing this step, writing a checkpoint and stopping" in err
    assert not (tmp_path / "cut.pt").exists()
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert ckpt["step"] == SIGNAL_AT  # off the checkpoint_every grid: written because of the signal
    assert not list((tmp_path / "cut").glob("*.tmp"))

    started.append(start(tmp_path / "cut", tmp_path / "resumed.pt", resume=True))
    rc, err = finish(started[-1])
    assert rc == 0, err[-3000:]
    rc, err = finish(uninterrupted)
    assert rc == 0, err[-3000:]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == FINETUNE["steps"]
    assert full["model"].keys() == resumed["model"].keys()
    for name, value in full["model"].items():
        assert torch.allclose(value.double(), resumed["model"][name].double(), rtol=1e-5, atol=1e-6), name
    # the resumed run continued the same loss curve (it did train after the signal)
    assert len(resumed["losses"]) == FINETUNE["steps"]
    assert torch.allclose(resumed["losses"], full["losses"], rtol=1e-5)
    moved = max(float((v.double() - ckpt["model"][k].double()).abs().max())
                for k, v in resumed["model"].items() if v.is_floating_point())
    assert moved > 1e-4


# ----------------------------------------------------------------------------- image files


def png_claiming(width: int, height: int) -> bytes:
    """A valid ~60-byte PNG whose header claims ``width x height`` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_a_huge_claimed_size_is_refused_before_decoding(tmp_path):
    from efquant_fx.data.transforms import UnreadableImage
    from efquant_fx.data.transforms import decode_image as train_decode
    from efquant_fx.eval.images import decode_image as eval_decode

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(60_000, 60_000))  # 3.6 Gpixel: would need gigabytes decoded
    with pytest.raises(EfquantError, match=r"bomb.png: image refused as a decompression bomb"):
        eval_decode(bomb, name=str(bomb))
    with pytest.raises(UnreadableImage, match="too many pixels"):
        train_decode(bomb)
    # a dataset counts it as unreadable rather than crashing or allocating
    from efquant_fx.data import build_dataset

    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    (root / "a" / "bomb.png").write_bytes(png_claiming(60_000, 60_000))
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (9, 9, 9)).save(buf, "PNG")
    (root / "a" / "ok.png").write_bytes(buf.getvalue())
    dataset, report = build_dataset({"kind": "folder", "root": str(root)}, train=False)
    assert report.unreadable == 1 and len(dataset) == 1


def test_training_limit_does_not_leak_into_evaluation():
    """Importing the training data code must not make evaluation refuse ordinary photos as bombs."""
    import efquant_fx.data  # noqa: F401  (sets the training limit)
    from efquant_fx.eval.images import decode_image as eval_decode

    buf = io.BytesIO()
    Image.new("RGB", (1200, 1200), (1, 2, 3)).save(buf, "PNG")  # 1.4 Mpixel photo, aligned later
    assert eval_decode(buf.getvalue(), name="photo").shape == (1200, 1200, 3)
    from efquant_fx.data.transforms import UnreadableImage
    from efquant_fx.data.transforms import decode_image as train_decode

    with pytest.raises(UnreadableImage, match="exceeds the 802816-pixel limit"):
        train_decode(buf.getvalue())  # training still keeps its own, lower limit


def test_truncated_image_in_a_dataset_is_substituted_not_fatal(tmp_path):
    from efquant_fx.data import build_dataset

    root = tmp_path / "faces"
    for name, color in (("a", (200, 10, 10)), ("b", (10, 200, 10))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(np.full((112, 112, 3), color, np.uint8)).save(buf, "JPEG")
            (root / name / f"{i}.jpg").write_bytes(buf.getvalue())
    dataset, report = build_dataset({"kind": "folder", "root": str(root), "validate": "none"}, train=False)
    data = (root / "a" / "1.jpg").read_bytes()
    (root / "a" / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated after the scan
    image, label = dataset[dataset.keys.index("a/1.jpg")]
    assert image.shape == (3, 112, 112) and label == dataset.label_names.index("a")
    assert report.substituted == 1


# ----------------------------------------------------------------------------- list files (found by the fuzzers)


def test_a_list_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    from efquant_fx.data.listfile import read_list

    listing = tmp_path / "train.lst"
    listing.write_bytes(b"a/1.jpg\t0\n\xff\xfe\x00binary\t1\n")
    with pytest.raises(EfquantError, match=r"train.lst: not a UTF-8 text file \(undecodable byte b'\\xff'\)"):
        read_list(listing)


def test_a_pairs_header_with_unicode_digits_is_one_clear_error(tmp_path):
    from efquant_fx.eval.pairs import read_pairs

    pairs = tmp_path / "pairs.txt"
    pairs.write_text("² 1\n")  # str.isdigit() says yes, int() says no
    with pytest.raises(EfquantError, match=r"pairs.txt: line 1: expected 'path1 path2 label', got 2 fields"):
        read_pairs(pairs, tmp_path)


# ----------------------------------------------------------------------------- writes that fail halfway


def disk_full_after(nbytes: int):
    """A ``torch.save`` that writes ``nbytes`` and then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04" + b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    from efquant_fx.result import FileWriteError, atomic_torch_save

    target = tmp_path / "model.pt"
    atomic_torch_save({"step": 1}, target)
    monkeypatch.setattr(torch, "save", disk_full_after(100))
    with pytest.raises(EfquantError) as err:
        atomic_torch_save({"step": 2}, target)
    assert str(err.value) == f"{target}: cannot write the file (No space left on device); the previous model.pt " \
                             f"is intact"
    assert isinstance(err.value, FileWriteError) and err.value.errno == errno.ENOSPC  # also an OSError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    # a first write that fails leaves nothing at all
    monkeypatch.setattr(torch, "save", disk_full_after(10))
    with pytest.raises(EfquantError, match=r"new.pt: cannot write the file \(No space left on device\); nothing "
                                           r"was written"):
        atomic_torch_save({"step": 1}, tmp_path / "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_any_failure_mid_write_removes_the_temp_file(tmp_path, monkeypatch):
    from efquant_fx.result import atomic_torch_save, atomic_write_bytes

    def interrupted(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not an OSError: re-raised as it is, after the clean-up
        atomic_torch_save({}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EfquantError, match=r"file/sub/b.json: cannot write the file \(Not a directory\); nothing "
                                           r"was written"):
        atomic_write_bytes(blocker / "sub" / "b.json", b"{}")


def test_a_full_disk_while_saving_a_result_or_recipe_is_one_clear_error(tmp_path, monkeypatch):
    from efquant_fx.recipe import load_recipe

    recipe = load_recipe({"name": "r"})
    recipe.save(tmp_path / "recipe.yaml")

    def full(self, data):
        with open(self, "wb") as fh:
            fh.write(data[:5])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(EfquantError, match=r"recipe.yaml: cannot write the file \(No space left on device\); the "
                                           r"previous recipe.yaml is intact"):
        load_recipe({"name": "other"}).save(tmp_path / "recipe.yaml")
    monkeypatch.undo()
    assert load_recipe(tmp_path / "recipe.yaml").name == "r"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# ----------------------------------------------------------------------------- compress(): OOM, missing paths


def test_out_of_memory_while_calibrating_suggests_a_smaller_batch(monkeypatch):
    from efquant_fx import compress
    from efquant_fx.graph import passes
    from tests.finetune.tiny import TinyFaceNet

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.11 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(passes.calib, "calibrate", oom)
    with pytest.raises(EfquantError) as err:
        compress(TinyFaceNet(), BASE)
    assert str(err.value) == ("calibration.batch_size: out of memory on cpu during calibration with calibration "
                              "batches of 8 images (CUDA out of memory. Tried to allocate 2.00 GiB); use a smaller "
                              "batch: lower calibration.batch_size")
    monkeypatch.undo()
    monkeypatch.setattr(passes.ptq, "gptq", oom)
    with pytest.raises(EfquantError, match=r"during GPTQ with calibration batches of 8 images .*lower "
                                           r"calibration.batch_size \(GPTQ holds one Hessian per layer: add large "
                                           r"layers to ptq.gptq_exclude\)$"):
        compress(TinyFaceNet(), {**BASE, "ptq": {"gptq": True}})


def test_missing_data_and_weights_name_the_field_and_the_absolute_path(tmp_path, monkeypatch):
    from efquant_fx import compress
    from tests.finetune.tiny import TinyFaceNet

    monkeypatch.chdir(tmp_path)  # relative recipe paths resolve against the current directory
    cal = {**BASE["calibration"], "data": {"kind": "folder", "root": "my/faces"}}
    with pytest.raises(EfquantError) as err:
        compress(TinyFaceNet(), {**BASE, "calibration": cal})
    assert str(err.value) == (f"{tmp_path}/my/faces: calibration.data.root: image folder not found (expected "
                              f"root/<identity>/<image>)")
    cal["data"] = {"kind": "list", "list": "lists/train.lst"}
    with pytest.raises(EfquantError, match=rf"^{tmp_path}/lists/train.lst: calibration.data.list: list file not "
                                           rf"found$"):
        compress(TinyFaceNet(), {**BASE, "calibration": cal})
    with pytest.raises(EfquantError, match=rf"^{tmp_path}/w/backbone.pth: model.weights: weights file not found$"):
        compress(TinyFaceNet(), {**BASE, "model": {"weights": "w/backbone.pth"}})


def test_cli_refusals_are_one_line(tmp_path, monkeypatch):
    """A missing data folder, an alias bomb and a --set into a list: exit code 2 and one error line."""
    from typer.testing import CliRunner

    from efquant_fx.cli import app
    from tests.test_recipe import laughs

    def refused(args: list[str]) -> str:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        # stderr is not a terminal here, so progress log lines ("12:03:04 compress: ...") may come first
        lines = [ln for ln in res.output.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d ", ln)]
        assert len(lines) == 1 and lines[0].startswith("error: "), res.output
        return lines[0]

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: mobilefacenet, random_weights: true}\nquant: {}\ncalibration:\n"
                      "  images: 4\n  batch_size: 2\n"
                      "  data: {kind: folder, root: my/faces}\n")
    assert refused(["apply", str(recipe), "--out", str(tmp_path / "run")]) == \
        f"error: {tmp_path}/my/faces: calibration.data.root: image folder not found (expected root/<identity>/<image>)"
    into_a_list = ["--set", "quant.exclude=[a]", "--set", "quant.exclude.x=1"]
    assert refused(["recipes", "validate", str(recipe), *into_a_list]) == \
        "error: --set: quant.exclude.x: quant.exclude is a list of 1 item: address its items by index 0 to 0, not 'x'"
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(laughs())
    assert refused(["recipes", "validate", str(bomb)]).startswith(f"error: {bomb}: line 5, column 14: aliases (*l0")
