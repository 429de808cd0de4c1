"""ONNX graph rewrites keep the values exactly while changing what onnxruntime runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from efquant_fx.export.onnx_rewrite import prelu_to_elementwise, shorten_tensor_names


def prelu_graph(slope: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", len(slope), 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", len(slope), 5, 5])
    node = helper.make_node("PRelu", ["x", "s"], ["y"], name="act")
    init = numpy_helper.from_array(slope.reshape(-1, 1, 1).astype(np.float32), "s")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [init]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("slopes, ops", [
    ([0.0, 0.25, 1.0, -0.5], {"Mul", "Max"}),                # every slope <= 1: Max(x, s*x)
    ([0.25, 1.5, 2.4, -1.6], {"Mul", "Max"}),                # some > 1: sign-flipped Max
])
def test_prelu_rewrite_is_bit_identical_and_drops_prelu(slopes, ops):
    model = prelu_graph(np.array(slopes))
    x = np.random.default_rng(0).normal(size=(3, len(slopes), 5, 5)).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    want = run(model, x)
    assert prelu_to_elementwise(model) == 1
    onnx.checker.check_model(model)
    assert {n.op_type for n in model.graph.node} == ops
    assert np.array_equal(run(model, x), want)


def test_prelu_slope_behind_identity_is_still_a_constant():
    """torch.onnx.export shares repeated slope tensors through Identity nodes."""
    model = prelu_graph(np.array([0.1, 1.7]))
    model.graph.node.insert(0, helper.make_node("Identity", ["s"], ["s2"]))
    model.graph.node[1].input[1] = "s2"
    x = np.random.default_rng(1).normal(size=(2, 2, 5, 5)).astype(np.float32)
    want = run(model, x)
    assert prelu_to_elementwise(model) == 1
    assert "PRelu" not in {n.op_type for n in model.graph.node}
    assert np.array_equal(run(model, x), want)


def test_prelu_with_a_computed_slope_is_left_alone():
    model = prelu_graph(np.array([0.1, 0.2]))
    node = helper.make_node("Neg", ["s"], ["s2"])
    model.graph.node.insert(0, node)
    model.graph.node[1].input[1] = "s2"
    assert prelu_to_elementwise(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Neg", "PRelu"]


def test_short_tensor_names_keep_io_names_values_and_shrink_the_file():
    model = prelu_graph(np.array([0.1, 0.2]))
    model.graph.initializer[0].name = "/layers.0/weight_quant/export_handler_38/Constant_2_output_0"
    model.graph.node[0].input[1] = model.graph.initializer[0].name
    x = np.random.default_rng(2).normal(size=(1, 2, 5, 5)).astype(np.float32)
    want = run(model, x)
    saved = shorten_tensor_names(model)
    onnx.checker.check_model(model)
    assert saved > 40 and model.graph.initializer[0].name == "t0"
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    assert model.graph.node[0].name == "act"  # node names say which layer: kept
    assert np.array_equal(run(model, x), want)
