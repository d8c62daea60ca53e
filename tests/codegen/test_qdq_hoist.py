"""QuantizeLinear moved ahead of Reshape/Transpose (effc.codegen.qdq_hoist): the same bytes out of
ONNX Runtime, and nothing moved where it would not be elementwise or where a link has other uses."""

from __future__ import annotations

import numpy as np
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from effc.codegen.qdq_hoist import hoist_quantize


def heads_model(scale_shape=(), extra_use: bool = False):
    """x[2, 5, 6] -> Reshape [2, 5, 3, 2] -> Transpose -> QuantizeLinear (u8, zero point 7) -> DQ."""
    scale = numpy_helper.from_array(np.full(scale_shape, 0.05, np.float32), "s")
    zp = numpy_helper.from_array(np.full(scale_shape, 7, np.uint8), "z")
    shape = numpy_helper.from_array(np.array([2, 5, 3, 2], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1, 3]),
             helper.make_node("QuantizeLinear", ["t", "s", "z"], ["q"], name="quant",
                              **({"axis": 1} if scale_shape else {})),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant",
                              **({"axis": 1} if scale_shape else {}))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 2])]
    if extra_use:
        nodes.append(helper.make_node("Neg", ["r"], ["n"], name="other"))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [2, 5, 3, 2]))
    graph = helper.make_graph(nodes, "h", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 6])],
                              outputs, [scale, zp, shape])
    graph.value_info.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3, 5, 2]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_quantize_moves_ahead_of_the_layout_change_bit_exactly():
    x = (np.random.default_rng(0).standard_normal((2, 5, 6)) * 4).astype(np.float32)  # clipping both ends
    model = heads_model()
    before = run(model, x)
    assert hoist_quantize(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "Reshape", "Transpose", "DequantizeLinear"]
    assert not [v for v in model.graph.value_info if v.name == "t"]  # bytes now: no float annotation
    after = run(model, x)
    np.testing.assert_array_equal(after[0], before[0])


def test_per_axis_or_shared_links_stay():
    assert hoist_quantize(heads_model(scale_shape=(3,))) == 0
    model = heads_model(extra_use=True)
    moved = hoist_quantize(model)  # the Transpose is single-use: only it is passed
    assert moved == 1 and [n.op_type for n in model.graph.node][:3] == ["Reshape", "QuantizeLinear", "Transpose"]
    x = np.random.default_rng(1).standard_normal((2, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x)[0], run(heads_model(extra_use=True), x)[0])


def requantized_model(second_scale=0.05, direct=False, dq_extra_use=False, zp_dtype=np.uint8):
    """x[2, 5, 6] -> Q -> DQ -> Reshape -> Q -> DQ -> Transpose -> Q -> DQ -> y: ORT's all-ops QDQ
    around a head layout change (``direct``: a DQ -> Q pair with no move between; ``second_scale``:
    the Reshape's Q parameters; ``dq_extra_use``: the first DQ also read by a Neg)."""
    zp = 7 if zp_dtype == np.uint8 else -3
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(second_scale, np.float32), "s2"),
             numpy_helper.from_array(np.array(zp, zp_dtype), "z"),
             numpy_helper.from_array(np.array([2, 5, 3, 2], np.int64), "shape")]
    node = helper.make_node
    nodes = [node("QuantizeLinear", ["x", "s", "z"], ["q0"]), node("DequantizeLinear", ["q0", "s", "z"], ["d0"])]
    if direct:
        nodes += [node("QuantizeLinear", ["d0", "s", "z"], ["q1"]), node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
                  node("Reshape", ["d1", "shape"], ["r"])]
    else:
        nodes += [node("Reshape", ["d0", "shape"], ["r0"]), node("QuantizeLinear", ["r0", "s2", "z"], ["q1"]),
                  node("DequantizeLinear", ["q1", "s2", "z"], ["r"])]
    nodes += [node("Transpose", ["r"], ["t0"], perm=[0, 2, 1, 3]), node("QuantizeLinear", ["t0", "s2", "z"], ["q2"]),
              node("DequantizeLinear", ["q2", "s2", "z"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 2])]
    if dq_extra_use:
        nodes.append(node("Neg", ["d0"], ["n"]))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [2, 5, 6]))
    graph = helper.make_graph(nodes, "rq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 6])],
                              outputs, inits)
    graph.value_info.append(helper.make_tensor_value_info("r" if direct else "r0", TensorProto.FLOAT, [2, 5, 3, 2]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("direct, dq_extra_use, zp_dtype", [(False, False, np.uint8), (True, False, np.uint8),
                                                             (False, True, np.int8)])
def test_requantize_pairs_of_equal_parameters_drop_bit_exactly(direct, dq_extra_use, zp_dtype):
    from effc.codegen.qdq_hoist import drop_requantize

    x = (np.random.default_rng(2).standard_normal((2, 5, 6)) * 5).astype(np.float32)  # clipping both ends
    model = requantized_model(direct=direct, dq_extra_use=dq_extra_use, zp_dtype=zp_dtype)
    before = run(model, x)
    assert drop_requantize(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1 + dq_extra_use, ops
    assert ops.count("Identity") == direct, ops  # a DQ -> Q pair with nothing between: Q(DQ(q)) = q
    assert not model.graph.value_info  # bytes now: no float annotation
    after = run(model, x)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def test_requantize_with_other_parameters_stays():
    from effc.codegen.qdq_hoist import drop_requantize

    model = requantized_model(second_scale=0.07)  # Reshape's pair rescales: only the Transpose's drops
    x = (np.random.default_rng(3).standard_normal((2, 5, 6)) * 5).astype(np.float32)
    before = run(model, x)
    assert drop_requantize(model) == 1
    np.testing.assert_array_equal(run(model, x)[0], before[0])
