"""Deployable exports: int8 ONNX (onnxruntime), torch.ao int8, packed sub-8-bit weights.

Brevitas ONNX export takes 10-40 s per model on 2 cores, so one arcface_r18 export is shared by
the whole module (``r18_export``); everything else uses a tiny conv net or no export at all.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from efquant_fx import EfquantError, compress, create_model
from efquant_fx.export import export_model, export_onnx_qcdq, load_packed, read_packed, save_packed
from efquant_fx.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from efquant_fx.export.parity import cosine, run, session
from efquant_fx.export.requant import add_output_points
from efquant_fx.graph.ptq import reestimate_batchnorm
from tests.conftest import face_batch, shared_dir

pytestmark = pytest.mark.filterwarnings("ignore")


def recipe(w: int = 8, a: int = 8, name: str | None = "arcface_r18", **quant) -> dict:
    return {"model": {"name": name}, "device": "cpu", "quant": {"weight_bits": w, "act_bits": a, **quant},
            "calibration": {"images": 16, "batch_size": 8}}


def calibrated(name: str) -> nn.Module:
    """Random weights with BN statistics re-estimated on a batch, so activations have face-net scale."""
    torch.manual_seed(0)
    model = create_model(name)
    reestimate_batchnorm(model, [face_batch(16, seed=1)])
    return model


class TinyNet(nn.Module):
    """Conv-BN-PReLU with a residual add and a pre-activation BN: the insightface patterns, small."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 16)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = x + self.conv2(self.bn2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.prelu.weight.uniform_(0.1, 0.4)
    reestimate_batchnorm(model, [face_batch(8, seed=1)])
    return model


CAL = face_batch(16, seed=2)
CHECK = face_batch(8, seed=3)


@pytest.fixture(scope="module")
def r18_w8():
    return compress(calibrated("arcface_r18"), recipe(), calibration_data=CAL)


@pytest.fixture(scope="module")
def r18_export(r18_w8, tmp_path_factory):
    out = tmp_path_factory.mktemp("r18_export")
    reports = export_model(r18_w8, out, formats=("onnx_qcdq", "onnx_float", "torch_int8"), inputs=CHECK,
                           calibration=CAL)
    return out, reports


@pytest.fixture(scope="module")
def r18_exported_graph(r18_w8):
    """The PyTorch graph the int8 ONNX was exported from: the compressed graph plus the same
    calibrated output requantization points (deterministic: same batches, same observers)."""
    gm = copy.deepcopy(r18_w8.model).eval()
    add_output_points(gm, [CAL[:8], CAL[8:]])
    return gm


# --- bit packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=1237).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.nbytes == packed_nbytes(codes.size, bits)
    assert np.array_equal(unpack_bits(packed, bits, codes.size), codes)


def test_bitpack_refuses_codes_too_wide():
    with pytest.raises(ValueError):
        pack_bits(np.array([16], dtype=np.uint8), 4)


# --- ONNX --------------------------------------------------------------------------------------


def test_int8_onnx_runs_integer_kernels_and_matches_fake_quant(r18_export, r18_exported_graph):
    out, reports = r18_export
    rep = reports["onnx_qcdq"]
    assert Path(rep.path) == out / "model_int8.onnx" and rep.bytes == Path(rep.path).stat().st_size
    # every conv and residual add fused into integer kernels; only the embedding Gemm stays float
    assert rep.runtime_op_counts.get("QLinearConv") == 21 and "Conv" not in rep.float_compute
    assert rep.runtime_op_counts.get("QLinearAdd") == 8
    assert rep.float_compute == {"Gemm": 1}
    assert rep.added_output_points == 21
    # the exporter's own parity numbers, per onnxruntime level
    assert rep.cosine["disable_all"] >= 0.997 and rep.cosine["enable_all"] >= 0.995
    assert rep.cosine_vs_compressed["enable_all"] >= 0.99
    # and an independent check on other inputs
    x = face_batch(6, seed=11)
    with torch.no_grad():
        ref = r18_exported_graph(x)
    for level in ("enable_all", "disable_all"):
        got = run(session(rep.path, level, threads=2), x)
        assert cosine(got, ref).mean() >= 0.995, level


def test_onnx_follows_insightface_conventions(r18_export):
    path = r18_export[1]["onnx_qcdq"].path
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["data"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert len(model.graph.output) == 1
    sess = session(path, threads=2)
    for n in (1, 3):
        assert run(sess, face_batch(n, seed=n)).shape == (n, 512)


def test_float_teacher_onnx_matches_pytorch(r18_export):
    rep = r18_export[1]["onnx_float"]
    assert rep.kind == "float" and rep.outputs == ["embedding"]
    assert min(rep.cosine.values()) > 0.9999
    assert "QuantizeLinear" not in rep.op_counts


def test_torch_int8_runs_and_matches_float(r18_export, r18_w8):
    rep = r18_export[1]["torch_int8"]
    assert rep.cosine_vs_float > 0.98 and rep.quantized_modules > 20
    scripted = torch.jit.load(rep.path)
    x = face_batch(3, seed=5)
    with torch.no_grad():
        got, ref = scripted(x), r18_w8.teacher(x)
    assert got.shape == (3, 512)
    assert cosine(got, ref).mean() > 0.98


def test_manifest_lists_files_and_no_temp_files_remain(r18_export):
    out, reports = r18_export
    assert Path(reports["manifest"]).is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    import json

    manifest = json.loads(Path(reports["manifest"]).read_text())
    assert set(manifest["files"]) == {"onnx_qcdq", "onnx_float", "torch_int8"}
    assert manifest["reports"]["onnx_qcdq"]["any_float_compute"] is True  # the float embedding Gemm


def test_exact_graph_export_of_tiny_net(tmp_path):
    """Without int8 kernels the ONNX mirrors the compressed graph (ActQuant wrappers exported)."""
    result = compress(tiny(), recipe(name=None), calibration_data=CAL)
    rep = export_onnx_qcdq(result.model, tmp_path / "tiny.onnx", inputs=CHECK, int8_kernels=False)
    n_points = result.summary["act_quant_points"]
    assert rep.op_counts["QuantizeLinear"] == n_points and rep.added_output_points == 0
    assert rep.cosine["disable_all"] > 0.999
    assert rep.cosine_vs_compressed["disable_all"] > 0.999


def test_sub8bit_graph_exports_with_integer_clips(tmp_path):
    """W4A4: Q -> Clip -> DQ chains (4-bit ranges inside int8 tensors) survive the uint8 rewrite."""
    result = compress(tiny(), recipe(4, 4, name=None), calibration_data=CAL)
    rep = export_onnx_qcdq(result.model, tmp_path / "w4a4.onnx", calibration=[CAL], inputs=CHECK)
    assert rep.op_counts["Clip"] >= result.summary["act_quant_points"]
    assert rep.cosine["disable_all"] > 0.99
    model = onnx.load(rep.path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    act_zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.uint8 for z in act_zero_points)


def test_uncalibrated_act_point_is_refused(tmp_path):
    result = compress(tiny(), recipe(name=None), calibration_data=CAL)
    next(m for m in result.model.modules() if type(m).__name__ == "ActQuant").mode = "float"
    with pytest.raises(EfquantError, match="not calibrated"):
        export_onnx_qcdq(result.model, tmp_path / "x.onnx", calibration=[CAL])
    assert not (tmp_path / "x.onnx").exists()


# --- errors ------------------------------------------------------------------------------------


def test_bad_output_directory_and_format(tmp_path):
    result = compress(tiny(), recipe(name=None), calibration_data=CAL)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(EfquantError, match="not a folder"):
        export_model(result, not_a_dir, formats=("packed",))
    with pytest.raises(EfquantError, match="cannot create"):
        export_model(result, not_a_dir / "sub", formats=("packed",))
    with pytest.raises(EfquantError, match="unknown export format"):
        export_model(result, tmp_path / "out", formats=("tflite",))
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(EfquantError, match="not writable"):
            export_model(result, locked, formats=("packed",))


# --- packed weights ----------------------------------------------------------------------------


def test_packed_w4_is_small_and_restores_embeddings(tmp_path):
    teacher = calibrated("arcface_r18")
    result = compress(teacher, recipe(4, 8), calibration_data=CAL)
    reports = export_model(result, tmp_path, formats=("packed", "torch_int8"), calibration=CAL)
    rep = reports["packed"]
    assert "skipped" in reports["torch_int8"]  # 4-bit weights: no torch.ao kernels
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    assert rep.bytes <= 0.14 * buf.tell(), rep.bytes / buf.tell()
    assert rep.bits == {"4": 22}
    x = face_batch(4, seed=7)
    with torch.no_grad():
        ref = result.model(x)
        from_result = load_packed(rep.path, result)(x)
        from_name = load_packed(rep.path)(x)  # rebuilt from the recipe's model name (weights all in the file)
    assert torch.equal(from_result, ref)
    assert torch.allclose(from_name, ref, atol=1e-6)
    meta, arrays = read_packed(rep.path)
    assert meta["recipe"]["quant"]["weight_bits"] == 4 and "packed/fc" in arrays


@pytest.mark.parametrize("quant", [
    {"weight_symmetric": False},
    {"weight_granularity": "per_tensor", "weight_estimator": "mse", "act_symmetric": False},
    {"layers": [{"match": "^conv1$", "weight_bits": 8}], "batchnorm": "keep"},
])
def test_packed_roundtrip_is_exact_for_quantizer_variants(tmp_path, quant):
    model = tiny()
    result = compress(model, {**recipe(3, 8, name=None, **quant), "ptq": {"bias_correction": True}},
                      calibration_data=CAL)
    rep = save_packed(result, tmp_path / "tiny.npz")
    restored = load_packed(rep.path, lambda: TinyNet())
    with torch.no_grad():
        assert torch.equal(restored(CHECK), result.model(CHECK))


def test_load_packed_errors(tmp_path):
    result = compress(tiny(), recipe(4, 8, name=None), calibration_data=CAL)
    rep = save_packed(result, tmp_path / "tiny.npz")
    with pytest.raises(EfquantError, match="does not name its model"):
        load_packed(rep.path)
    with pytest.raises(EfquantError, match="does not match"):
        load_packed(rep.path, create_model("mobilefacenet"))
    with pytest.raises(EfquantError, match="not found"):
        load_packed(tmp_path / "missing.npz", TinyNet())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EfquantError, match="not a packed"):
        load_packed(tmp_path / "junk.npz", TinyNet())


# --- real faces --------------------------------------------------------------------------------


def lfw_faces(n: int) -> torch.Tensor:
    from PIL import Image

    files = sorted((shared_dir() / "data" / "lfw112" / "images").rglob("*.jpg"))[: n * 7 : 7][:n]
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - 127.5) / 127.5


@pytest.mark.real_data
def test_onnx_matches_fake_quant_on_real_faces(r18_export, r18_exported_graph):
    if not (shared_dir() / "data" / "lfw112" / "images").is_dir():
        pytest.skip("real data not available (set EFQUANT_SHARED)")
    x = lfw_faces(32)
    assert x.shape == (32, 3, 112, 112)
    with torch.no_grad():
        ref = r18_exported_graph(x)
    got = run(session(r18_export[1]["onnx_qcdq"].path, "enable_all", threads=2), x)
    assert cosine(got, ref).mean() >= 0.995


def test_torch_int8_lowers_a_model_whose_batchnorm_was_kept(tmp_path):
    """batchnorm: keep leaves conv->BN pairs for torch.ao to fuse: both must be in eval mode."""
    result = compress(tiny(), recipe(name=None, batchnorm="keep"), calibration_data=CAL)
    assert any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    reports = export_model(result, tmp_path, formats="torch_int8", calibration=[CAL], inputs=CHECK)
    assert not isinstance(reports["torch_int8"], dict)  # not skipped
    assert (tmp_path / "model_int8.torchscript.pt").is_file()


# --- quantized PReLU in the torch int8 lowering --------------------------------------------------


@pytest.mark.parametrize("slopes", [[0.25] * 4, [-0.4, 0.0, 0.3, 1.0], [-1.5, 0.1, 0.7, 2.4]])
def test_prelu_slopes_sit_on_a_grid_with_one_exact(slopes):
    from efquant_fx.export.torch_int8 import quantize_prelu

    w = torch.tensor(slopes)
    qw, err = quantize_prelu(w)
    k = round(1 / qw.q_scale())
    assert qw.dtype == torch.quint8 and abs(k * qw.q_scale() - 1) < 1e-6  # 1.0 is a grid point
    assert err == pytest.approx((qw.dequantize() - w).abs().max().item(), abs=1e-6) and err <= 0.5 / k + 1e-6
    if slopes[0] == 0.25:
        assert err < 1e-6


@pytest.mark.parametrize("act_points", [None, ["compute_input", "compute_output", "prelu", "residual_add"]])
def test_quantized_prelu_matches_the_float_round_trip(act_points):
    """quantized::prelu with the 1.0-exact slope grid lands within one output level of
    dequantize -> float PReLU -> quantize, for negative and >1 per-channel slopes; also where a
    compute_output point (an Identity in the lowered graph) sits between the conv and the PReLU."""
    import torch.ao.nn.quantized as nnq

    from efquant_fx.export.torch_int8 import FloatPReLU, lower, quantize_prelu

    torch.manual_seed(0)
    slopes = torch.linspace(-0.6, 1.8, 16)
    x = torch.quantize_per_tensor(torch.randn(4, 16, 9, 9) * 2, 0.03, 120, torch.quint8)
    x = x.contiguous(memory_format=torch.channels_last)
    qprelu = nnq.PReLU(0.05, 100, 16)
    qprelu.set_weight(quantize_prelu(slopes)[0])
    got = qprelu(x).int_repr().int()
    want = torch.quantize_per_tensor(nn.functional.prelu(x.dequantize(), slopes), 0.05, 100, torch.quint8)
    assert (got - want.int_repr().int()).abs().max() <= 1

    model = tiny()
    with torch.no_grad():
        model.prelu.weight.copy_(torch.linspace(-0.3, 1.4, 8))
    points = {"act_points": act_points} if act_points else {}
    result = compress(model, recipe(name=None, **points), calibration_data=CAL)
    fast = lower(result.model, [CAL])
    slow = lower(result.model, [CAL], quantized_prelu=False)
    assert not any(isinstance(m, FloatPReLU) for m in fast.modules())
    assert any(isinstance(m, nnq.PReLU) for m in fast.modules())
    assert any(isinstance(m, FloatPReLU) for m in slow.modules())
    with torch.no_grad():
        assert cosine(fast(CHECK), slow(CHECK)).min() > 0.999


def test_export_imports_brevitas_without_the_hadamard_warning():
    """Issue 16, item 10: every export printed Brevitas's 'fast_hadamard_transform package not found'
    UserWarning (a fresh interpreter: the warning comes once, on the first import of brevitas.graph)."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('always')\n"
            "from efquant_fx.export.onnx_qcdq import _brevitas_exporter\n"
            "_brevitas_exporter()\n"
            "import brevitas.graph.equalize\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fast_hadamard_transform" not in proc.stderr
