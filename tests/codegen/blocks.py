"""Tiny ONNX models for codegen tests, built with onnx.helper (no torch export: fast)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ, DIM, HEADS, FFN = 16, 64, 2, 128


def model_from_nodes(nodes, inputs, outputs, inits=(), opset=17):
    """An effc IR model of ``nodes`` with float inputs/outputs given as (name, shape) pairs."""
    from effc.frontend.onnx import from_proto

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return from_proto(proto)


def transformer_block_proto(seed: int = 0) -> onnx.ModelProto:
    """One pre-LN encoder block: x[1,16,64] -> LN -> 2-head attention -> +x -> LN -> MLP(erf GELU) -> +."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def w(name, *shape):
        return const(name, (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    hd = DIM // HEADS
    ones, zeros = const("ones", np.ones(DIM, np.float32)), const("zeros", np.zeros(DIM, np.float32))
    heads_shape = const("heads_shape", np.array([1, SEQ, HEADS, hd], np.int64))
    flat_shape = const("flat_shape", np.array([1, SEQ, DIM], np.int64))
    h = node("LayerNormalization", ["x", ones, zeros], "ln1", axis=-1, epsilon=1e-5)
    q, k, v = (node("MatMul", [h, w(f"W{n}", DIM, DIM)], n) for n in "qkv")
    qh = node("Transpose", [node("Reshape", [q, heads_shape], "q4")], "qh", perm=[0, 2, 1, 3])
    kh = node("Transpose", [node("Reshape", [k, heads_shape], "k4")], "kh", perm=[0, 2, 3, 1])
    vh = node("Transpose", [node("Reshape", [v, heads_shape], "v4")], "vh", perm=[0, 2, 1, 3])
    scores = node("Mul", [node("MatMul", [qh, kh], "qk"), const("scale", np.float32(hd ** -0.5))], "scores")
    attn = node("MatMul", [node("Softmax", [scores], "probs", axis=-1), vh], "attn")
    merged = node("Reshape", [node("Transpose", [attn], "attn_t", perm=[0, 2, 1, 3]), flat_shape], "merged")
    proj = node("Add", [node("MatMul", [merged, w("Wo", DIM, DIM)], "o"), const("bo", rng.standard_normal(DIM).astype(np.float32))], "proj")
    r1 = node("Add", ["x", proj], "r1")
    h2 = node("LayerNormalization", [r1, ones, zeros], "ln2", axis=-1, epsilon=1e-5)
    f1 = node("Add", [node("MatMul", [h2, w("W1", DIM, FFN)], "f1m"), const("b1", rng.standard_normal(FFN).astype(np.float32))], "f1")
    erf = node("Erf", [node("Mul", [f1, const("rsqrt2", np.float32(0.5 ** 0.5))], "f1s")], "erf")
    gelu = node("Mul", [node("Mul", [f1, node("Add", [erf, const("one", np.float32(1.0))], "erf1")], "g0"),
                        const("half", np.float32(0.5))], "gelu")
    f2 = node("MatMul", [gelu, w("W2", FFN, DIM)], "f2")
    node("Add", [r1, f2], "y")
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
