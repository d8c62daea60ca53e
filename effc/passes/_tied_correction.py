"""Keep a tied embedding / LM head tied when the stream's copy of it is recentred.

Recentring the embedding table E [V, d] over d gives E' = E - m 1^T with m = mean_d(E) [V].
The LM head reads the same table as logits = x @ E^T. Instead of untying (a second V x d copy,
+38M parameters on GPT-2), keep one table E' for both and correct the head exactly:

    x @ E^T = x @ E'^T + (x @ 1) m^T = x @ E'^T + ReduceSum_d(x) * m

which costs V parameters and one multiply-add per logit.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, new_initializer


def _transposed_head(value: ir.Value, node: ir.Node, index: int) -> list[ir.Node] | None:
    """The MatMuls reading ``value`` as x @ value^T through ``node`` (a 2-D Transpose), if that is the use."""
    if index != 0 or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get_ints("perm", None)
    if len(value.shape or ()) != 2 or list(perm or [1, 0]) != [1, 0]:
        return None
    readers = list(node.outputs[0].uses())
    if node.outputs[0].is_graph_output() or not readers:
        return None
    if all(r.op_type == "MatMul" and i == 1 for r, i in readers):
        return [r for r, _ in readers]
    return None


def correctable_heads(replacement) -> list[ir.Node] | None:
    """The LM-head MatMuls to correct when every reader of the replaced constant outside the stream
    is x @ table^T and the table is only recentred over its last axis; None otherwise."""
    value, edits = replacement.value, replacement.edits
    if value.is_graph_output() or any(e.scale is not None or e.centre_axes not in ({1}, {-1}) for e in edits):
        return None
    edited = {(id(e.node), e.index) for e in edits}
    heads: list[ir.Node] = []
    for node, index in value.uses():
        if (id(node), index) in edited:
            continue
        found = _transposed_head(value, node, index)
        if found is None:
            return None
        heads.extend(found)
    return heads or None


def correct_heads(graph: ir.Graph, table: ir.Value, heads: list[ir.Node]) -> None:
    """Add ReduceSum(x) * mean_d(table) after each head MatMul (call before ``table`` is recentred)."""
    original = const_value(table)
    means = original.astype(np.float64).mean(axis=1).astype(original.dtype)
    mean_value = new_initializer(graph, means, f"{table.name}_row_mean")
    axes = new_initializer(graph, np.array([-1], np.int64), f"{table.name}_sum_axes")
    for head in heads:
        x, out = head.inputs[0], head.outputs[0]
        total = ir.node("ReduceSum", [x, axes], {"keepdims": 1}, name=f"{head.name}_tied_sum")
        shift = ir.node("Mul", [total.outputs[0], mean_value], name=f"{head.name}_tied_shift")
        fixed = ir.node("Add", [out, shift.outputs[0]], name=f"{head.name}_tied_fix")
        graph.insert_after(head, [total, shift, fixed])
        name = out.name
        out.replace_all_uses_with(fixed.outputs[0], replace_graph_outputs=True)
        fixed.replace_input_with(0, out)  # the line above also rerouted the fix's own input
        out.name, fixed.outputs[0].name = f"{name}_uncorrected", name  # the public name stays put
        fixed.outputs[0].type, fixed.outputs[0].shape = out.type, out.shape  # a graph output must be typed
