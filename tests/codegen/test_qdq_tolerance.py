"""effc.codegen.qdq_tolerance: how far a compiled QDQ model may be from ONNX Runtime.

Found by the generality sweep (int8-effc, DeiT at batch 2): ONNX Runtime's fused run and the graph as
written agreed on the feed (rounding 5e-7), effc's module flipped one activation step that neither
did (its layer norm and GELU round in another order) and `effc compile` would have called the
correct module wrong (max rel err 6e-4 > 1e-4). The flip sensitivity is what such a step does."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.codegen.qdq_tolerance import flip_sensitivity, is_quantized, ort_rounding, tolerance_for

SCALE = 0.1


def activation_qdq_matmul(weight: np.ndarray):
    """y = DQ(Q(x; SCALE, 128)) @ weight: a per-tensor u8 activation quantization before a float linear."""
    k, n = weight.shape
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"), numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_a_value_within_float_rounding_of_a_step_widens_the_tolerance():
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model = activation_qdq_matmul(weight)
    x = np.full((1, 8), 1.0, np.float32)
    x[0, 3] = np.float32(0.25)  # 0.25 / 0.1f = 2.4999999: a float-rounding nudge takes it to step 3
    feeds = [{"x": x}]
    assert is_quantized(model)
    assert ort_rounding(model, feeds) < 1e-6  # ONNX Runtime's two runs agree on this feed...
    as_written = (np.round(x / np.float32(SCALE)) * np.float32(SCALE)) @ weight  # x[3] on step 2
    one_step = float(np.abs(SCALE * weight[3]).max() / np.abs(as_written).max())
    flips = flip_sensitivity(model, feeds)
    assert abs(flips - one_step) < 1e-3 * one_step  # ...and a flip moves y by one step of x[3]
    assert tolerance_for(model, feeds, 1e-4) >= 2 * flips > 1e-2


def test_values_far_from_a_step_keep_the_float_tolerance():
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model = activation_qdq_matmul(weight)
    feeds = [{"x": np.full((1, 8), 1.02, np.float32)}]  # 10.2 steps: float rounding cannot move it to 10.5
    assert flip_sensitivity(model, feeds) < 1e-6
    assert tolerance_for(model, feeds, 1e-4) == 1e-4
