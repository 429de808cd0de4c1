"""MXNet symbol + .params importer, without MXNet: files written here in the documented layout."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efquant_fx.errors import EfquantError
from efquant_fx.models.mxnet_import import load_mxnet_model, read_mxnet_params

RNG = np.random.default_rng(1)
V1, V2 = 0xF993FAC8, 0xF993FAC9
_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2, np.dtype(np.int8): 5}


def _ndarray(arr: np.ndarray, layout: str) -> bytes:
    arr = np.ascontiguousarray(arr)
    if layout == "legacy":  # no magic: uint32 ndim, uint32 dims
        out = struct.pack("<I", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
    elif layout == "v1":
        out = struct.pack("<II", V1, arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
    else:  # v2: magic, storage type 0 (dense), uint32 ndim, int64 dims
        out = struct.pack("<IiI", V2, 0, arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
    out += struct.pack("<iii", 1, 0, _FLAGS[arr.dtype])  # cpu(0), dtype flag
    return out + arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def write_params(path: Path, arrays: dict[str, np.ndarray], layout: str = "v2") -> Path:
    blob = struct.pack("<QQQ", 0x112, 0, len(arrays))
    blob += b"".join(_ndarray(a, layout) for a in arrays.values())
    blob += struct.pack("<Q", len(arrays))
    for name in arrays:
        raw = name.encode()
        blob += struct.pack("<Q", len(raw)) + raw
    path.write_bytes(blob)
    return path


class _Sym:
    """Builds an MXNet symbol node list the way ``sym.tojson()`` lays it out."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.ids: dict[str, int] = {}

    def var(self, name: str) -> int:
        self.nodes.append({"op": "null", "name": name, "inputs": []})
        self.ids[name] = len(self.nodes) - 1
        return self.ids[name]

    def op(self, op: str, name: str, inputs: list[int | str], **attrs: str) -> int:
        refs = [[self.ids[i] if isinstance(i, str) else i, 0, 0] for i in inputs]
        node = {"op": op, "name": name, "inputs": refs}
        if attrs:
            node["attrs"] = attrs
        self.nodes.append(node)
        self.ids[name] = len(self.nodes) - 1
        return self.ids[name]

    def save(self, path: Path, head: int) -> Path:
        args = [i for i, n in enumerate(self.nodes) if n["op"] == "null"]
        path.write_text(json.dumps({"nodes": self.nodes, "arg_nodes": args, "heads": [[head, 0, 0]],
                                    "attrs": {"mxnet_version": ["int", 10000]}}))
        return path


def _bn_params(prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"arg:{prefix}_gamma": (1 + RNG.standard_normal(c) * 0.1).astype(np.float32),
        f"arg:{prefix}_beta": (RNG.standard_normal(c) * 0.1).astype(np.float32),
        f"aux:{prefix}_moving_mean": (RNG.standard_normal(c) * 0.1).astype(np.float32),
        f"aux:{prefix}_moving_var": (1 + np.abs(RNG.standard_normal(c))).astype(np.float32),
    }


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A MobileFaceNet-like block: scalar normalisation, conv/bn/prelu, residual, pool, FC, BN."""
    s = _Sym()
    s.var("data")
    s.op("_minus_scalar", "minus", ["data"], scalar="127.5")
    s.op("_mul_scalar", "mul", ["minus"], scalar="0.0078125")
    conv = dict(kernel="(3, 3)", num_filter="4", pad="(1, 1)", stride="(2, 2)", no_bias="True")
    s.var("conv1_weight")
    s.op("Convolution", "conv1", ["mul", "conv1_weight"], **conv)
    for v in ("gamma", "beta", "moving_mean", "moving_var"):
        s.var(f"bn1_{v}")
    s.op("BatchNorm", "bn1", ["conv1", "bn1_gamma", "bn1_beta", "bn1_moving_mean", "bn1_moving_var"],
         fix_gamma="False", momentum="0.9")
    s.var("relu1_gamma")
    s.op("LeakyReLU", "relu1", ["bn1", "relu1_gamma"], act_type="prelu")
    s.var("dw_weight")
    s.op("Convolution", "dw", ["relu1", "dw_weight"], kernel="(3, 3)", num_filter="4", num_group="4",
         pad="(1, 1)", no_bias="True")
    s.var("pw_weight")
    s.var("pw_bias")
    s.op("Convolution", "pw", ["dw", "pw_weight", "pw_bias"], kernel="(1, 1)", num_filter="4")
    for v in ("gamma", "beta", "moving_mean", "moving_var"):
        s.var(f"bn2_{v}")
    # MXNet defaults: fix_gamma=True, eps=1e-3
    s.op("BatchNorm", "bn2", ["pw", "bn2_gamma", "bn2_beta", "bn2_moving_mean", "bn2_moving_var"])
    s.op("elemwise_add", "plus0", ["bn2", "relu1"])
    s.op("Pooling", "pool", ["plus0"], kernel="(2, 2)", stride="(2, 2)", pool_type="avg")
    s.op("Dropout", "drop", ["pool"], p="0.4")
    s.var("fc_weight")
    s.var("fc_bias")
    s.op("FullyConnected", "fc", ["drop", "fc_weight", "fc_bias"], num_hidden="5")
    for v in ("gamma", "beta", "moving_mean", "moving_var"):
        s.var(f"emb_{v}")
    head = s.op("BatchNorm", "emb", ["fc", "emb_gamma", "emb_beta", "emb_moving_mean", "emb_moving_var"],
                eps="2e-05", fix_gamma="True")
    s.var("softmax_label")  # training-only variable, not reachable from the head

    params = {
        "arg:conv1_weight": (RNG.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
        **_bn_params("bn1", 4),
        "arg:relu1_gamma": RNG.uniform(0, 0.5, 4).astype(np.float32),
        "arg:dw_weight": (RNG.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32),
        "arg:pw_weight": (RNG.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32),
        "arg:pw_bias": (RNG.standard_normal(4) * 0.1).astype(np.float32),
        **_bn_params("bn2", 4),
        "arg:fc_weight": (RNG.standard_normal((5, 16)) * 0.3).astype(np.float32),
        "arg:fc_bias": (RNG.standard_normal(5) * 0.1).astype(np.float32),
        **_bn_params("emb", 5),
        "arg:fc7_weight": np.zeros((10, 5), np.float32),  # classifier head that the symbol does not use
    }
    return s.save(tmp_path / "model-symbol.json", head), params


def _reference(raw: torch.Tensor, p: dict[str, np.ndarray]) -> torch.Tensor:
    """The tiny symbol written out by hand with torch.nn.functional on raw 0..255 pixels."""
    t = {k.split(":", 1)[1]: torch.from_numpy(v) for k, v in p.items()}

    def bn(x: torch.Tensor, name: str, eps: float, fix_gamma: bool) -> torch.Tensor:
        gamma = torch.ones_like(t[f"{name}_gamma"]) if fix_gamma else t[f"{name}_gamma"]
        return F.batch_norm(x, t[f"{name}_moving_mean"], t[f"{name}_moving_var"], gamma, t[f"{name}_beta"],
                            training=False, eps=eps)

    x = (raw - 127.5) * 0.0078125
    x = bn(F.conv2d(x, t["conv1_weight"], stride=2, padding=1), "bn1", 1e-3, False)
    y = F.prelu(x, t["relu1_gamma"])
    x = F.conv2d(y, t["dw_weight"], padding=1, groups=4)
    x = bn(F.conv2d(x, t["pw_weight"], t["pw_bias"]), "bn2", 1e-3, True)  # MXNet defaults
    x = F.avg_pool2d(x + y, 2, 2)
    x = F.linear(x.flatten(1), t["fc_weight"], t["fc_bias"])
    return bn(x, "emb", 2e-5, True)


@pytest.mark.parametrize("layout", ["v2", "v1", "legacy"])
def test_tiny_symbol_matches_hand_written_reference(tiny, tmp_path: Path, layout: str) -> None:
    sym, params = tiny
    write_params(tmp_path / "model-0000.params", params, layout)
    gm = load_mxnet_model(sym, tmp_path / "model-0000.params")
    raw = torch.rand(3, 3, 8, 8) * 255
    want = _reference(raw, params)
    with torch.no_grad():
        got = gm((raw - 127.5) / 127.5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [type(m) for m in gm.children()] == [nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Conv2d, nn.Conv2d,
                                               nn.BatchNorm2d, nn.AvgPool2d, nn.Flatten, nn.Linear,
                                               nn.BatchNorm1d]
    assert gm.get_submodule("dw").groups == 4
    assert (gm.input_name, gm.output_name) == ("data", "emb")
    meta = gm.meta_preprocessing
    assert meta["normalization_stripped"]
    assert meta["graph_normalization"]["ops"] == ["_minus_scalar", "_mul_scalar"]
    # keeping the symbol's own convention: feed raw pixels
    orig = load_mxnet_model(sym, tmp_path / "model-0000.params", normalized_input=False)
    with torch.no_grad():
        torch.testing.assert_close(orig(raw), want, atol=1e-4, rtol=1e-4)
    assert copy.deepcopy(gm).meta_preprocessing == meta  # metadata survives the quantizer's deepcopy
    traced = torch.fx.symbolic_trace(gm)
    with torch.no_grad():
        torch.testing.assert_close(traced((raw - 127.5) / 127.5), want, atol=1e-4, rtol=1e-4)


def test_read_params_splits_arg_and_aux(tmp_path: Path) -> None:
    arrays = {"arg:w": np.arange(6, dtype=np.float32).reshape(2, 3), "aux:m": np.ones(2, np.float16),
              "q": np.array([-1, 2], np.int8)}
    args, aux = read_mxnet_params(write_params(tmp_path / "p.params", arrays))
    assert set(args) == {"w", "q"} and set(aux) == {"m"}
    np.testing.assert_array_equal(args["w"], arrays["arg:w"])
    assert aux["m"].dtype == np.float16 and args["q"].dtype == np.int8


def test_malformed_params_raise_efquant_error(tiny, tmp_path: Path) -> None:
    sym, params = tiny
    good = write_params(tmp_path / "good.params", params).read_bytes()
    bad = tmp_path / "bad.params"
    for cut in (0, 5, 16, 30, 60, 200, len(good) // 2, len(good) - 3):
        bad.write_bytes(good[:cut])
        with pytest.raises(EfquantError, match="bad.params"):
            load_mxnet_model(sym, bad)
    cases = {
        b"\x13" + good[1:]: "magic",  # list magic
        good + b"\x00": "trailing",
        good[:24] + struct.pack("<I", V2) + struct.pack("<i", 2) + good[32:]: "sparse",
        good[:24] + struct.pack("<I", 0xDEAD) + good[28:]: "ndim",
    }
    for blob, words in cases.items():
        bad.write_bytes(blob)
        with pytest.raises(EfquantError, match=words):
            read_mxnet_params(bad)
    # wrong dtype flag on the first array: 24 header + (magic, stype, ndim) 12 + 4 dims * 8 + context 8
    flag_at = 24 + 12 + 32 + 8
    bad.write_bytes(good[:flag_at] + struct.pack("<i", 99) + good[flag_at + 4:])
    with pytest.raises(EfquantError, match="dtype flag 99"):
        read_mxnet_params(bad)


def test_unsupported_op_and_missing_param_are_named(tiny, tmp_path: Path) -> None:
    sym, params = tiny
    pf = write_params(tmp_path / "model-0000.params", params)
    data = json.loads(sym.read_text())
    next(n for n in data["nodes"] if n["name"] == "pool")["op"] = "ROIPooling"
    odd = tmp_path / "odd-symbol.json"
    odd.write_text(json.dumps(data))
    with pytest.raises(EfquantError, match=r"ROIPooling \(pool\)"):
        load_mxnet_model(odd, pf)
    partial = write_params(tmp_path / "partial.params", {k: v for k, v in params.items()
                           if "pw_bias" not in k})
    with pytest.raises(EfquantError, match="Convolution node 'pw'.*pw_bias"):
        load_mxnet_model(sym, partial)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(EfquantError, match="broken.json"):
        load_mxnet_model(tmp_path / "broken.json", pf)


def test_elementwise_reshape_and_head_ops_match_torch(tmp_path: Path) -> None:
    """The op handlers the tiny block does not reach, against the same computation in torch."""
    s = _Sym()
    s.var("data")
    s.op("Activation", "relu", ["data"], act_type="relu")
    s.op("clip", "clip", ["data"], a_min="-0.5", a_max="0.5")
    s.op("broadcast_mul", "mul", ["relu", "clip"])
    s.op("_rminus_scalar", "rminus", ["mul"], scalar="2")
    s.op("_div_scalar", "div", ["rminus"], scalar="4")
    s.op("add_n", "sum3", ["div", "relu", "clip"])
    s.op("LeakyReLU", "leaky", ["sum3"], act_type="leaky", slope="0.1")
    s.op("Concat", "cat", ["leaky", "data"], dim="1")
    s.op("Pooling", "gap", ["cat"], global_pool="True", pool_type="avg", kernel="(1, 1)")
    s.op("Reshape", "flat", ["gap"], shape="(0, -1)")
    s.var("fc_weight")
    head = s.op("FullyConnected", "fc", ["flat", "fc_weight"], num_hidden="2", no_bias="True")
    w = RNG.standard_normal((2, 6)).astype(np.float32)
    sym = s.save(tmp_path / "ops-symbol.json", head)
    gm = load_mxnet_model(sym, write_params(tmp_path / "ops.params", {"arg:fc_weight": w}))
    assert not gm.meta_preprocessing["graph_normalizes"]  # scalar ops after other ops are not input scaling

    x = torch.randn(2, 3, 5, 5)
    relu, clip = x.clamp(min=0), x.clamp(-0.5, 0.5)
    y = F.leaky_relu((2 - relu * clip) / 4 + relu + clip, 0.1)
    want = F.linear(torch.cat([y, x], 1).mean((2, 3)), torch.from_numpy(w))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)
    assert isinstance(gm.get_submodule("clip"), nn.Hardtanh)


# ---------------------------------------------------------------------------------------------
# Real model (skipped unless ../shared exists)
# ---------------------------------------------------------------------------------------------


def _pairs(shared: Path, n: int) -> tuple[list[tuple], list[tuple]]:
    """The first ``n`` genuine and ``n`` impostor pairs of dev_pairs.txt (LFW pairs layout)."""
    same, diff = [], []
    for line in (shared / "data" / "lfw112" / "dev_pairs.txt").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) == 3 and len(same) < n:
            same.append(((f[0], int(f[1])), (f[0], int(f[2]))))
        elif len(f) == 4 and len(diff) < n:
            diff.append(((f[0], int(f[1])), (f[2], int(f[3]))))
    return same, diff


@pytest.mark.real_data
def test_mobilefacenet_y1_gives_sensible_embeddings(shared: Path) -> None:
    from PIL import Image

    d = shared / "models" / "insightface_mobilefacenet_y1"
    gm = load_mxnet_model(d / "model-symbol.json", d / "model-0000.params")
    assert isinstance(gm, torch.fx.GraphModule)
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 49
    assert sum(isinstance(m, nn.PReLU) for m in gm.modules()) == 33
    torch.fx.symbolic_trace(gm)

    same, diff = _pairs(shared, 2)
    faces = [face for pair in same + diff for face in pair]
    root = shared / "data" / "lfw112" / "images"
    x = np.stack([np.asarray(Image.open(root / n / f"{n}_{i:04d}.jpg").convert("RGB"), dtype=np.float32)
                  for n, i in faces]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        emb = F.normalize(gm(torch.from_numpy((x - 127.5) / 127.5)), dim=1)
    assert emb.shape == (8, 128)
    cos = (emb[0::2] * emb[1::2]).sum(1)
    genuine, impostor = cos[:2], cos[2:]
    assert genuine.min() > impostor.max() + 0.3, (genuine, impostor)
