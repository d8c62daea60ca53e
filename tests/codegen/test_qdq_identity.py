"""Requantisations that give back their input's bytes (effc.codegen.qdq_identity): dropped, and ONNX
Runtime running the graph as written gives the same bits before and after; near misses stay."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.codegen.qdq_identity import _no_wider, drop_unit_requantize

S1, Z = np.float32(0.05), 7


def scores_model(c=0.125, s2=None, mask=0.0, mask_shape=(1, 1, 5, 5), div=False, extra_use=False, zp2=Z):
    """x[2, 3, 5, 5] -> Q(S1, Z) -> DQ -> Mul c (or Div 1/c) -> Q(s2, zp2) -> DQ -> Add DQ(Q(mask))
    -> Q(s2, zp2) -> DQ -> y: attention's scores between Q.K^T and the softmax, as quantize_static
    writes them."""
    s2 = np.float32(S1 * c) if s2 is None else np.float32(s2)
    inits = [numpy_helper.from_array(np.array(S1), "s1"), numpy_helper.from_array(np.array(Z, np.uint8), "z1"),
             numpy_helper.from_array(np.array(s2), "s2"), numpy_helper.from_array(np.array(zp2, np.uint8), "z2"),
             numpy_helper.from_array(np.array(np.float32(1 / c if div else c)), "c"),
             numpy_helper.from_array(np.full(mask_shape, mask, np.float32), "mask"),
             numpy_helper.from_array(np.array(np.float32(1.0)), "ms"),
             numpy_helper.from_array(np.array(0, np.uint8), "mz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"]),
             helper.make_node("Div" if div else "Mul", ["d1", "c"], ["scaled"]),
             helper.make_node("QuantizeLinear", ["scaled", "s2", "z2"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"]),
             helper.make_node("QuantizeLinear", ["mask", "ms", "mz"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "ms", "mz"], ["md"]),
             helper.make_node("Add", ["d2", "md"], ["masked"]),
             helper.make_node("QuantizeLinear", ["masked", "s2", "z2"], ["q3"]),
             helper.make_node("DequantizeLinear", ["q3", "s2", "z2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 5])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [2, 3, 5, 5]))
    graph = helper.make_graph(nodes, "scores", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
                              outputs, inits)
    graph.value_info.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [2, 3, 5, 5]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def as_written(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def scores(seed=0):
    # every byte 0..255 reached, and clipping at both ends
    return (np.random.default_rng(seed).uniform(-1, 1, (2, 3, 5, 5)) * 8).astype(np.float32)


@pytest.mark.parametrize("c, div", [(0.125, False), (32 ** -0.5, False), (0.125, True)])
def test_unit_rescale_and_zero_mask_drop_bit_exactly(c, div):
    x = scores()
    before = as_written(scores_model(c, div=div), x)
    model = scores_model(c, div=div)
    assert drop_unit_requantize(model) == 2
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "Identity", "Identity", "DequantizeLinear"]
    np.testing.assert_array_equal(as_written(model, x)[0], before[0])


@pytest.mark.parametrize("kwargs, kept", [
    ({"s2": S1 * 0.125 * 1.001}, "Mul"),       # not a unit rescale (the mask's zero still drops)
    ({"zp2": Z + 1}, "Mul"),                   # another zero point
    ({"c": -0.125, "s2": S1 * 0.125}, "Mul"),  # a negative scale reverses the bytes
    ({"extra_use": True}, "Mul"),              # the scaled floats are read elsewhere (a graph output)
    ({"mask": 3.0}, "Add"),                    # a real mask (-3 would quantize to 0 and drop)
])
def test_near_misses_stay(kwargs, kept):
    model = scores_model(**kwargs)
    x = scores(1)
    before = as_written(scores_model(**kwargs), x)
    assert drop_unit_requantize(model) == 1
    assert kept in [n.op_type for n in model.graph.node]
    np.testing.assert_array_equal(as_written(model, x)[0], before[0])


def test_a_zero_wider_than_the_scores_is_no_identity():
    assert _no_wider((1, 1, 5, 5), [2, 3, 5, 5]) and _no_wider((), None) and _no_wider((1,), [4])
    assert not _no_wider((1, 4, 5, 5), [2, 1, 5, 5])       # the sum has 4 heads, the scores 1
    assert not _no_wider((1, 1, 1, 5, 5), [2, 3, 5, 5])    # a rank more
    assert not _no_wider((1, 1, 5, 5), None)               # shape unknown: not assumed
