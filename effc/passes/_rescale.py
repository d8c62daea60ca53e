"""Absorb a per-channel affine a * x + b into the weights of a Conv, Gemm or MatMul.

``*_outputs`` functions absorb an affine applied to the linear's output (BN after the linear);
``*_inputs`` functions one applied to its input (BN before it). Arithmetic is float64, results
are cast back to the weight's dtype and written as new initializers (``replace_input``), so a
constant shared with other nodes is never changed under them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, consumers, new_initializer, replace_input


def scale_conv_outputs(conv: ir.Node, weight: np.ndarray, bias: np.ndarray | None,
                       a: np.ndarray, b: np.ndarray) -> ir.Value:
    # Output channels are axis 0 of W [O, I/group, k...] whatever the group count.
    shape = (-1,) + (1,) * (weight.ndim - 1)
    replace_input(conv, 1, cast(weight.astype(np.float64) * a.reshape(shape), weight.dtype), _hint(conv, 1))
    _set_bias(conv, _bias64(bias, a.shape) * a + b, bias, weight.dtype)
    return conv.outputs[0]


def scale_gemm_outputs(gemm: ir.Node, weight: np.ndarray, bias: np.ndarray | None,
                       a: np.ndarray, b: np.ndarray) -> ir.Value:
    # Y = alpha * A B' + beta * C; output column n is row n of B when transB, else column n.
    shape = (-1, 1) if gemm.attributes.get_int("transB", 0) else (1, -1)
    replace_input(gemm, 1, cast(weight.astype(np.float64) * a.reshape(shape), weight.dtype), _hint(gemm, 1))
    beta = gemm.attributes.get_float("beta", 1.0)
    _set_bias(gemm, beta * _bias64(bias, a.shape) * a + b, bias, weight.dtype)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return gemm.outputs[0]


def scale_matmul_outputs(matmul: ir.Node, weight: np.ndarray, a: np.ndarray, b: np.ndarray | None) -> ir.Value:
    """Scale the columns of W [K, N]; add b after the MatMul unless ``b`` is None or zero."""
    replace_input(matmul, 1, cast(weight.astype(np.float64) * a, weight.dtype), _hint(matmul, 1))
    if b is None or not np.any(b):
        return matmul.outputs[0]
    return append_bias(matmul, cast(b, weight.dtype))


def scale_bias_add(add: ir.Node, index: int, bias: np.ndarray, a: np.ndarray, b: np.ndarray) -> ir.Value:
    """The bias (input ``index`` of ``add``) of a MatMul whose output channels were scaled by a."""
    replace_input(add, index, cast(bias.astype(np.float64) * a + b, bias.dtype), _hint(add, index))
    return add.outputs[0]


def scale_matmul_inputs(matmul: ir.Node, weight: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    # (a*x + b) W = x (diag(a) W) + b W: scale the rows of W, add b W to the bias.
    w64 = weight.astype(np.float64)
    replace_input(matmul, 1, cast(w64 * a[:, None], weight.dtype), _hint(matmul, 1))
    offset = b @ w64
    if not np.any(offset):
        return
    out = matmul.outputs[0]
    readers = consumers(out)
    if len(readers) == 1 and readers[0].op_type == "Add" and not out.is_graph_output():
        add = readers[0]
        index = 1 if add.inputs[0] is out else 0
        bias = const_value(add.inputs[index])
        if bias is not None and add.inputs[index] is not out:
            replace_input(add, index, cast(bias.astype(np.float64) + offset, bias.dtype), _hint(add, index))
            return
    append_bias(matmul, cast(offset, weight.dtype))


def scale_gemm_inputs(gemm: ir.Node, weight: np.ndarray, bias: np.ndarray | None,
                      a: np.ndarray, b: np.ndarray) -> None:
    # Y = alpha * (a*x + b) B' + beta * C: rows of B' scale by a, C' = beta * C + alpha * b B'.
    w64 = weight.astype(np.float64)
    trans_b = gemm.attributes.get_int("transB", 0)
    replace_input(gemm, 1, cast(w64 * (a[None, :] if trans_b else a[:, None]), weight.dtype), _hint(gemm, 1))
    offset = gemm.attributes.get_float("alpha", 1.0) * (b @ (w64.T if trans_b else w64))
    beta = gemm.attributes.get_float("beta", 1.0)
    _set_bias(gemm, beta * _bias64(bias, offset.shape) + offset, bias, weight.dtype)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def scale_conv_inputs(conv: ir.Node, weight: np.ndarray, bias: np.ndarray | None,
                      a: np.ndarray, b: np.ndarray) -> None:
    # Valid only without padding and with group 1 (the caller checks): every tap reads a*x + b.
    w64 = weight.astype(np.float64)
    shape = (1, -1) + (1,) * (weight.ndim - 2)
    replace_input(conv, 1, cast(w64 * a.reshape(shape), weight.dtype), _hint(conv, 1))
    offset = (w64 * b.reshape(shape)).sum(axis=tuple(range(1, weight.ndim)))
    _set_bias(conv, _bias64(bias, offset.shape) + offset, bias, weight.dtype)


def append_bias(linear: ir.Node, bias: np.ndarray) -> ir.Value:
    """Insert ``Add(output, bias)`` after ``linear`` and move every reader onto its result."""
    out = linear.outputs[0]
    uses = list(out.uses())
    constant = new_initializer(linear.graph, bias, f"{linear.inputs[1].name}_bias_bnfold")
    add = ir.node("Add", [out, constant], name=f"{linear.name}_bnfold_bias")
    add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
    linear.graph.insert_after(linear, add)
    for node, index in uses:
        node.replace_input_with(index, add.outputs[0])
    redirect(out, add.outputs[0], rewire=False)
    return add.outputs[0]


def redirect(old: ir.Value, new: ir.Value, rewire: bool = True) -> None:
    """Move readers (and a graph-output slot, keeping its name) from ``old`` to ``new``."""
    if old.is_graph_output():
        graph = old.graph
        name = old.name
        graph.outputs[graph.outputs.index(old)] = new
        old.name, new.name = f"{name}_bnfold_old", name
    if rewire:
        old.replace_all_uses_with(new)


def cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(array.astype(dtype))


def _bias64(bias: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape) if bias is None else bias.astype(np.float64)


def _set_bias(node: ir.Node, bias64: np.ndarray, old: np.ndarray | None, weight_dtype: np.dtype) -> None:
    """Write input 2 (Conv/Gemm bias), creating the optional input when the node had none."""
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    hint = node.inputs[2].name if node.inputs[2] is not None else f"{node.inputs[1].name}_bias"
    replace_input(node, 2, cast(bias64, old.dtype if old is not None else weight_dtype), f"{hint}_bnfold")


def _hint(node: ir.Node, index: int) -> str:
    return f"{node.inputs[index].name}_bnfold"
