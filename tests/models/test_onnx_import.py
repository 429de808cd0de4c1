"""ONNX -> FX importer: tiny graphs built with onnx.helper, checked against onnxruntime."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.onnx_import import _dequantize, load_onnx_model

RNG = np.random.default_rng(0)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _f32(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _save(tmp_path: Path, nodes, inits, *, name: str = "m.onnx", opset: int = 13, in_shape=(1, 3, 8, 8),
          out_shape=(1, 6), extra_inputs=()) -> Path:
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, list(in_shape)), *extra_inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(out_shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on each sample (the files fix the batch to 1)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"data": x[i:i + 1]})[0] for i in range(len(x))])


def _torch(gm: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return gm(torch.from_numpy(x)).numpy()


def _assert_close(out: np.ndarray, ref: np.ndarray, atol: float = 1e-4) -> None:
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < atol
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999


def _count(gm: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in gm.modules())


@pytest.fixture
def block_model(tmp_path: Path) -> Path:
    """Sub/Mul normalisation, conv+bn+prelu, residual add, flatten via Reshape[1,-1], Gemm, BN1d."""
    inits = [
        _init("sub_c", np.array([127.5], np.float32)), _init("mul_c", np.array([1 / 128], np.float32)),
        _init("w1", _f32(4, 3, 3, 3)), _init("b1", _f32(4)),
        _init("g1", 1 + _f32(4, scale=0.1)), _init("be1", _f32(4)), _init("m1", _f32(4)),
        _init("v1", 1 + np.abs(_f32(4))), _init("slope", _f32(4, 1, 1, scale=0.2)),
        _init("w2", _f32(4, 4, 1, 1)), _init("shape", np.array([1, -1], np.int64)),
        _init("wfc", _f32(6, 64, scale=0.1)), _init("bfc", _f32(6)),
        _init("g2", 1 + _f32(6, scale=0.1)), _init("be2", _f32(6)), _init("m2", _f32(6)),
        _init("v2", 1 + np.abs(_f32(6))),
    ]
    nodes = [
        helper.make_node("Sub", ["data", "sub_c"], ["s"], name="sub"),
        helper.make_node("Mul", ["s", "mul_c"], ["n"], name="mul"),
        helper.make_node("Conv", ["n", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["bn1"], name="bn1",
                         epsilon=1e-3),
        helper.make_node("PRelu", ["bn1", "slope"], ["p1"], name="prelu1"),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["r"], name="residual"),
        helper.make_node("Dropout", ["r"], ["d"], name="drop"),
        helper.make_node("Reshape", ["d", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["fc"], name="fc", transB=1),
        helper.make_node("BatchNormalization", ["fc", "g2", "be2", "m2", "v2"], ["out"], name="bn2"),
    ]
    return _save(tmp_path, nodes, inits)


def test_conv_bn_prelu_add_gemm_matches_onnxruntime(block_model: Path) -> None:
    raw = RNG.uniform(0, 255, (3, 3, 8, 8)).astype(np.float32)
    ref = _ort(block_model, raw)
    gm = load_onnx_model(block_model)
    _assert_close(_torch(gm, (raw - 127.5) / 127.5), ref)  # batch 3 although the file says 1
    # the graph's own Sub/Mul is folded into one multiply on our normalised input
    assert gm.meta_preprocessing["graph_normalizes"] and gm.meta_preprocessing["normalization_stripped"]
    assert gm.meta_preprocessing["graph_normalization"]["scale"] == [1 / 128]
    assert (gm.input_name, gm.output_name) == ("data", "out")
    assert [type(m) for m in gm.children()] == [nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Conv2d, nn.Linear,
                                               nn.BatchNorm1d]
    assert gm.get_submodule("prelu1").weight.shape == (4,)
    assert any(n.target is operator.add for n in gm.graph.nodes)
    assert not gm.training
    traced = torch.fx.symbolic_trace(gm)
    _assert_close(_torch(traced, (raw - 127.5) / 127.5), ref)


def test_original_input_convention_kept_on_request(block_model: Path) -> None:
    raw = RNG.uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)
    gm = load_onnx_model(block_model, normalized_input=False)
    _assert_close(_torch(gm, raw), _ort(block_model, raw))
    assert gm.meta_preprocessing["input_convention"] == "original"
    assert not gm.meta_preprocessing["normalization_stripped"]


def test_blocked_dequantize_linear_weights(tmp_path: Path) -> None:
    """Opset-21 int8 weights with block_size (last block partial), per-axis Gemm weight, MatMul+Add."""
    wq = RNG.integers(-128, 128, (4, 27), dtype=np.int8)
    ws = (RNG.uniform(0.5, 2, (4, 4)) * 1e-2).astype(np.float32)  # ceil(27 / 8) = 4 blocks
    wz = RNG.integers(-5, 5, (4, 4), dtype=np.int8)
    fq = RNG.integers(-128, 128, (5, 64), dtype=np.int8)
    fs = (RNG.uniform(0.5, 2, (5,)) * 1e-2).astype(np.float32)
    inits = [
        _init("wq", wq), _init("ws", ws), _init("wz", wz), _init("wshape", np.array([4, 3, 3, 3], np.int64)),
        _init("fq", fq), _init("fs", fs), _init("mm_b", _f32(6)), _init("mm_w", _f32(5, 6)),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], name="dq_w", axis=1, block_size=8),
        helper.make_node("Reshape", ["wdq", "wshape"], ["w"], name="w_reshape"),
        helper.make_node("Conv", ["data", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("DequantizeLinear", ["fq", "fs"], ["fw"], name="dq_fc", axis=0),
        helper.make_node("Gemm", ["f", "fw"], ["fc"], name="fc", transB=1),
        helper.make_node("MatMul", ["fc", "mm_w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "mm_b"], ["out"], name="matmul_bias"),
    ]
    path = _save(tmp_path, nodes, inits, opset=21)
    x = RNG.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    gm = load_onnx_model(path)
    _assert_close(_torch(gm, x), _ort(path, x))
    assert gm.meta_preprocessing["graph_normalizes"] is False
    assert _count(gm, nn.Linear) == 2 and _count(gm, nn.Conv2d) == 1
    assert gm.get_submodule("matmul").bias is not None  # MatMul + constant Add became one Linear


def test_dequantize_blocked_matches_loop() -> None:
    x = RNG.integers(-128, 128, (3, 10), dtype=np.int8)
    s = RNG.uniform(0.1, 1, (3, 3)).astype(np.float32)
    z = RNG.integers(-3, 3, (3, 3), dtype=np.int8)
    want = np.empty((3, 10), np.float32)
    for i in range(3):
        for j in range(10):
            want[i, j] = (float(x[i, j]) - z[i, j // 4]) * s[i, j // 4]
    np.testing.assert_allclose(_dequantize(x, s, z, axis=1, block=4), want, rtol=1e-6)
    with pytest.raises(ValueError, match="blocked scale shape"):
        _dequantize(x, s[:, :2], z[:, :2], axis=1, block=4)


def test_shape_gather_concat_flatten_pattern_is_batch_dynamic(tmp_path: Path) -> None:
    """``x.view(x.size(0), -1)`` as exported by torch: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    inits = [_init("w", _f32(2, 3, 3, 3)), _init("idx", np.array(0, np.int64)),
             _init("axes", np.array([0], np.int64)), _init("minus1", np.array([-1], np.int64)),
             _init("wfc", _f32(32, 6)), _init("scale", np.full((1, 3, 1, 1), 2.0, np.float32))]
    nodes = [
        helper.make_node("Mul", ["data", "scale"], ["xs"], name="prescale"),
        helper.make_node("Conv", ["xs", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c"], ["gp"], name="gap"),
        helper.make_node("Add", ["c", "gp"], ["cg"], name="add_gap"),
        helper.make_node("Shape", ["cg"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "idx"], ["n"], name="gather"),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["tgt"], name="concat", axis=0),
        helper.make_node("Reshape", ["cg", "tgt"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "wfc"], ["out"], name="fc"),
    ]
    path = _save(tmp_path, nodes, inits)
    raw = RNG.uniform(0, 255, (3, 3, 8, 8)).astype(np.float32)
    gm = load_onnx_model(path)
    _assert_close(_torch(gm, (raw - 127.5) / 127.5), _ort(path, raw), atol=1e-2)
    # a per-channel prescale with no offset is an input normalisation (folded, x 127.5 * 2)
    assert gm.meta_preprocessing["graph_normalization"]["scale"] == [2.0, 2.0, 2.0]


def test_unsupported_ops_are_listed(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["data"], ["r"], name="relu"),
        helper.make_node("Softmax", ["r"], ["s"], name="soft1"),
        helper.make_node("Erf", ["s"], ["e"], name="erf_a"),
        helper.make_node("Softmax", ["e"], ["out"], name="soft2"),
    ]
    path = _save(tmp_path, nodes, [], out_shape=(1, 3, 8, 8))
    with pytest.raises(EfquantError) as exc:
        load_onnx_model(path)
    msg = str(exc.value)
    assert str(path) in msg and "Softmax (soft1, soft2)" in msg and "Erf (erf_a)" in msg


def test_checker_failure_names_the_file(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["nowhere"], ["out"], name="relu")]
    path = _save(tmp_path, nodes, [], out_shape=(1, 3, 8, 8))
    with pytest.raises(EfquantError, match="check_model") as exc:
        load_onnx_model(path)
    assert str(path) in str(exc.value)
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"\x00not an onnx file")
    with pytest.raises(EfquantError, match="junk.onnx"):
        load_onnx_model(bad)
    with pytest.raises(EfquantError, match="not found"):
        load_onnx_model(tmp_path / "missing.onnx")


def test_weight_inputs_dropped_and_runtime_weight_refused(tmp_path: Path) -> None:
    """Unused weight names listed as inputs (as in SFace) are ignored; a conv weight fed at runtime is not."""
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1])
    unused = helper.make_tensor_value_info("old_weight", TensorProto.FLOAT, [2, 3, 1, 1])
    nodes = [helper.make_node("Conv", ["data", "w"], ["out"], name="conv", kernel_shape=[1, 1])]
    ok = _save(tmp_path, nodes, [_init("w", _f32(2, 3, 1, 1))], name="ok.onnx", out_shape=(1, 2, 8, 8),
               extra_inputs=[w_in, unused])
    assert load_onnx_model(ok).input_name == "data"
    bad = _save(tmp_path, nodes, [], name="bad.onnx", out_shape=(1, 2, 8, 8), extra_inputs=[w_in])
    with pytest.raises(EfquantError, match="exactly one real graph input"):
        load_onnx_model(bad)


# ---------------------------------------------------------------------------------------------
# Real model (skipped unless ../shared exists)
# ---------------------------------------------------------------------------------------------


def _faces(shared: Path, names: list[tuple[str, int]]) -> np.ndarray:
    from PIL import Image

    root = shared / "data" / "lfw112" / "images"
    imgs = [np.asarray(Image.open(root / n / f"{n}_{i:04d}.jpg").convert("RGB"), dtype=np.float32)
            for n, i in names]
    return np.stack(imgs).transpose(0, 3, 1, 2).copy()


@pytest.mark.real_data
def test_sface_matches_onnxruntime_on_real_faces(shared: Path, tmp_path: Path) -> None:
    path = shared / "models" / "sface" / "face_recognition_sface_2021dec_int8bq.onnx"
    gm = load_onnx_model(path)
    assert isinstance(gm, torch.fx.GraphModule)
    assert _count(gm, nn.Conv2d) == 27 and _count(gm, nn.PReLU) == 27
    assert gm.meta_preprocessing["graph_normalizes"] and gm.input_name == "data" and gm.output_name == "fc1"
    torch.fx.symbolic_trace(gm)

    # onnxruntime refuses the file as shipped (weight names listed as inputs): drop them for the reference.
    model = onnx.load(str(path))
    keep = [i for i in model.graph.input if i.name == "data"]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    clean = tmp_path / "sface_clean.onnx"
    onnx.save(model, str(clean))

    raw = _faces(shared, [("Abel_Pacheco", 1), ("Abel_Pacheco", 4), ("Akhmed_Zakayev", 1), ("Zico", 2)])
    ref = _ort(clean, raw)
    out = _torch(gm, (raw - 127.5) / 127.5)  # one batch of 4: the batch dim is dynamic
    _assert_close(out, ref, atol=1e-3)
