"""LayerNormalization's optional Mean and InvStdDev outputs in compiled modules (TVM's importer
returns 0-d zeros for them): computed from ONNX ops before import, checked against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.frontend.onnx import from_proto
from effc.ir import to_proto
from effc.verify import OrtRunner, deviation, make_inputs

pytest.importorskip("tvm")

TOL = 1e-4  # scale-relative, as verify.deviation measures it


def _layernorm_model(shape, axis, opset, outputs=("y", "mean", "istd"), reader=False):
    """x -> LayerNormalization(axis) with the given output names ('' = absent); ``reader``: the
    InvStdDev also feeds a Mul inside the graph (not only a graph output)."""
    rng = np.random.default_rng(len(shape) + opset)
    norm_shape = shape[axis:]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, norm_shape).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(norm_shape).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], list(outputs), name="ln", axis=axis,
                              epsilon=1e-3)]
    stats_shape = shape[:axis % len(shape)] + [1] * (len(shape) - axis % len(shape))
    graph_outputs = [("y", shape)] + [(name, stats_shape) for name in outputs[1:] if name]
    if reader:
        nodes.append(helper.make_node("Mul", ["istd", "two"], ["istd2"], name="scale_istd"))
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        graph_outputs = [("y", shape), ("istd2", stats_shape)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in graph_outputs],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return from_proto(proto)


@pytest.mark.parametrize("shape, axis, opset, outputs, reader", [
    ([2, 7, 13], -1, 17, ("y", "mean", "istd"), False),
    ([2, 3, 5, 7], 1, 18, ("y", "mean", "istd"), False),  # several normalised axes; ReduceMean axes as input
    ([3, 5, 9], -1, 17, ("y", "", "istd"), True),  # only InvStdDev, read inside the graph
], ids=["last-axis", "axis-1-opset18", "istd-only"])
def test_layernorm_statistics_match_ort(tmp_path, shape, axis, opset, outputs, reader):
    from effc.codegen.build import compile_model, run_compiled

    model = _layernorm_model(shape, axis, opset, outputs, reader)
    compile_model(model, "llvm", tmp_path)
    feeds = make_inputs(model, 2, seed=3)
    for feed in feeds:  # an offset and a spread, so a wrong mean or variance cannot hide
        feed["x"] = feed["x"] * 3.0 + 1.5
    got, want = run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds)
    for g, w in zip(got, want):
        assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in w.items()}
    assert deviation(got, want).max_rel < TOL, deviation(got, want)


def test_unread_statistics_are_dropped_before_import():
    from effc.codegen.layernorm_stats import expose_layernorm_stats

    model = _layernorm_model([2, 7, 13], -1, 17, outputs=("y", "mean", "istd"))
    proto = to_proto(model)
    del proto.graph.output[1:]  # nobody reads Mean or InvStdDev now
    proto = expose_layernorm_stats(proto)
    assert [(n.op_type, list(n.output)) for n in proto.graph.node] == [("LayerNormalization", ["y"])]
