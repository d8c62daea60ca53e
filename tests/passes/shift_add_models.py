"""Small models and inputs shared by the shift-add tests and the report tests."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(dims=(32, 64, 32, 16), seed=0, bias=True) -> onnx.ModelProto:
    """x -> [MatMul (+Add) -> Relu] x 3 -> y; first and last linears touch the graph's ends."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(dims)):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        prev = f"h{i}"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Add", [prev, f"b{i}"], [f"hb{i}"], name=f"fc{i}_bias"))
            prev = f"hb{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"act{i}"))
            prev = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(count=8, seed=0, k=32):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 16, k)).astype(np.float32)} for _ in range(count)]
