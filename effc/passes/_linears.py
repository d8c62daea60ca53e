"""Find the linears a weight-quantizing pass may rewrite: MatMul/Gemm with a constant 2-D weight.

Each candidate is normalised to y = x @ W^T + bias with W [N, K] (rows = outputs). A MatMul
whose only reader is an Add of a constant [N] vector takes that Add along as its bias.
Layers that quantization hurts most and saves least are flagged ``protected`` with the reason:
weights tied to an embedding table, the model's first layer (it reads a graph input directly)
and its last layer (it writes a graph output directly: LM heads, classifiers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, consumers
from effc.passes._op_semantics import MOVES_DATA, refusal


def _moves_data(node: ir.Node) -> bool:
    """A linear behind an op that only moves data still reads the model's input (writes its output)."""
    return refusal(node, MOVES_DATA) is None


@dataclass
class Linear:
    node: ir.Node
    x: ir.Value
    weight: np.ndarray           # [N, K]
    bias: np.ndarray | None      # [N]
    bias_add: ir.Node | None     # the Add folded in as bias (MatMul only)
    protected: str | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]


def find_linears(model: ir.Model) -> tuple[list[Linear], list[tuple[ir.Node, str]]]:
    """(candidates, [(node, reason)] for MatMul/Gemm nodes that are not candidates)."""
    found, refused = [], []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        lin = _matmul(node) if node.op_type == "MatMul" else _gemm(node)
        if isinstance(lin, str):
            refused.append((node, lin))
            continue
        lin.protected = _protection(lin)
        found.append(lin)
    return found, refused


def _matmul(node: ir.Node) -> Linear | str:
    w = const_value(node.inputs[1])
    if w is None:
        return "weight is not a constant"
    if w.ndim != 2:
        return f"weight has rank {w.ndim}, not 2"
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} (only float32)"
    bias, add = None, None
    y = node.outputs[0]
    readers = consumers(y)
    if not y.is_graph_output() and len(readers) == 1 and readers[0].op_type == "Add":
        other = readers[0].inputs[1] if readers[0].inputs[0] is y else readers[0].inputs[0]
        b = const_value(other)
        if b is not None and b.size == w.shape[1] and b.shape[-1:] == (w.shape[1],) and b.dtype == w.dtype:
            bias, add = b.reshape(-1), readers[0]
    return Linear(node, node.inputs[0], w.T, bias, add)


def _gemm(node: ir.Node) -> Linear | str:
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return "Gemm with transA"
    w = const_value(node.inputs[1])
    if w is None:
        return "weight is not a constant"
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} (only float32)"
    w = (w if attrs.get_int("transB", 0) else w.T) * attrs.get_float("alpha", 1.0)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_value(node.inputs[2])
        if c is None or c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
            return "bias is not a constant [N] vector"
        bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)) * attrs.get_float("beta", 1.0)
    return Linear(node, node.inputs[0], w.astype(np.float32), None if bias is None else bias.astype(np.float32), None)


def _protection(lin: Linear) -> str | None:
    if any(reader.op_type == "Gather" for reader in consumers(lin.node.inputs[1])):
        return "weight tied to an embedding table"
    if _reaches(lin.output, downstream=True):
        return "last layer (writes the model output: LM head / classifier)"
    if _reaches(lin.x, downstream=False):
        return "first layer (reads the model input)"
    return None


def _reaches(value: ir.Value, downstream: bool) -> bool:
    """Whether ``value`` is a graph output (input) up to ops that only move data (and a bias Add downstream)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if (v.is_graph_output() if downstream else v.is_graph_input()):
            return True
        if downstream:
            stack += [o for n in consumers(v) if n.op_type == "Add" or _moves_data(n) for o in n.outputs]
        else:
            producer = v.producer()
            if producer is not None and _moves_data(producer) and producer.inputs:
                stack.append(producer.inputs[0])
    return False
