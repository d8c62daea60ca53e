"""How ONNX ops move the hidden axis: shapes, broadcasting, and which constants a writer recentres.

Axes are negative (counted from the end) wherever ranks may be unknown; a negative axis that an
operand lacks means the operand is broadcast along it, i.e. the same for every channel.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from effc.ir import const_value
from effc.passes._op_semantics import ELEMENTWISE, PERMUTE, RESHAPE, SCALE, ZERO_MEAN, ops_with, refusal

WRITERS = ("MatMul", "Gemm", "Conv", "Gather")
# Selections have their own steps in the stream walk: Slice and Split along the hidden axis or not,
# Gather as a writer (a lookup in a constant table).
_UNSELECTING = (ELEMENTWISE, PERMUTE, RESHAPE)
# Ops a zero-mean stream passes through unchanged in mean, following the hidden axis.
PLUMBING = ops_with(ZERO_MEAN, axes=_UNSELECTING)
# Ops a per-channel scale (LayerScale) moves across on its way into the stream's writers.
SCALE_CARRIERS = ops_with(SCALE, axes=_UNSELECTING)


def writer_slots(node: ir.Node, axis: int) -> list[tuple[int, int]] | str:
    """The constant inputs to recentre so that ``node``'s output is zero-mean along ``axis``.

    Each slot is (input index, axis of that input's array); a negative axis is a broadcast
    operand's (right-aligned) axis, a non-negative one a weight's output-feature axis.
    """
    op, inputs = node.op_type, node.inputs
    weight = const_value(inputs[1]) if op in ("MatMul", "Gemm", "Conv") else const_value(inputs[0])
    if weight is None:
        return "its weight is not a constant"
    if op == "MatMul":
        if weight.ndim < 2 or axis != -1:
            return "the hidden axis is not its output-feature axis"
        return [(1, weight.ndim - 1)]
    if op == "Gemm":
        if axis != -1:
            return "the hidden axis is not its output-feature axis"
        slots = [(1, 0 if node.attributes.get_int("transB", 0) else 1)]
        return slots + ([(2, -1)] if len(inputs) > 2 and inputs[2] is not None else [])
    if op == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            return "it is a grouped convolution"
        if axis != 1 - weight.ndim:
            return "the hidden axis is not its channel axis"
        if len(inputs) > 2 and inputs[2] is not None:
            return [(1, 0), (2, 0)] if const_value(inputs[2]) is not None else "its bias is not a constant"
        return [(1, 0)]
    table_axis = gather_source_axis(node, axis)  # Gather from a constant table
    return "it indexes along the hidden axis" if table_axis is None else [(0, table_axis)]


def plumbing_axis(node: ir.Node, value: ir.Value, axis: int, prop: str = ZERO_MEAN) -> int | str:
    """For ops that have ``prop`` (see ``_op_semantics``): the axis of input 0 that output ``axis``
    comes from (relative to that input's rank), or why there is none."""
    op = node.op_type
    if value is not node.outputs[0]:
        return f"'{value.name}' is not its data output"
    reason = refusal(node, prop)
    if reason:
        return reason
    if op == "Transpose":
        rank = rank_of(value)
        attr = node.attributes.get("perm")
        perm = list(attr.value) if attr is not None else (list(range(rank))[::-1] if rank else None)
        if not perm or len(perm) < -axis:
            return "its rank is unknown"
        return perm[len(perm) + axis] - len(perm)
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        source, target = shape_of(node.inputs[0]), shape_of(value)
        if source is None or target is None:
            return "its shapes are unknown"
        mapped = reshaped_axis(source, target, axis)
        return "it does not keep the hidden dimension intact" if mapped is None else mapped
    return axis  # Identity, Neg, Cast, Dropout: elementwise


def shape_of(value: ir.Value) -> list | None:
    array = const_value(value)
    if array is not None:
        return list(array.shape)
    return list(value.shape) if value.shape is not None else None


def rank_of(value: ir.Value) -> int | None:
    shape = shape_of(value)
    return None if shape is None else len(shape)


def extent_along(value: ir.Value, axis: int) -> str | None:
    """'full' if ``value`` varies along the (right-aligned) hidden ``axis``, 'per-token' if it is
    broadcast along it (missing or size 1), None if unknown."""
    shape = shape_of(value)
    if shape is None:
        return None
    if len(shape) < -axis:
        return "per-token"
    dim = shape[axis]
    if not isinstance(dim, int):
        return None
    return "per-token" if dim == 1 else "full"


def gather_source_axis(node: ir.Node, axis: int) -> int | None:
    """The data axis that output ``axis`` of a Gather comes from (None: it comes from the indices)."""
    data_rank, index_rank = rank_of(node.inputs[0]), rank_of(node.inputs[1])
    if data_rank is None or index_rank is None:
        return None
    gather_axis = node.attributes.get_int("axis", 0) % data_rank
    out = data_rank - 1 + index_rank + axis
    if 0 <= out < gather_axis:
        return out
    if out >= gather_axis + index_rank:
        return out - index_rank + 1
    return None


def reshaped_axis(source: list, target: list, axis: int) -> int | None:
    """The source axis holding the same hidden dimension, with the same trailing size after it."""
    i = len(target) + axis
    if i < 0 or not isinstance(target[i], int):
        return None
    for j, dim in enumerate(source):
        if dim == target[i] and _same_size(source[j + 1:], target[i + 1:]):
            return j - len(source)
    return None


def _same_size(a: list, b: list) -> bool:
    if all(isinstance(d, int) for d in a + b):
        return math.prod(a) == math.prod(b)
    named = [d for d in a + b if not isinstance(d, int)]
    return all(d.value is not None for d in named) and [str(d) for d in a] == [str(d) for d in b]
