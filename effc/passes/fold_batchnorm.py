"""fold-batchnorm: fold inference BatchNorm (and SLAB's RepBN) into an adjacent linear op.

Each BN site is first read as a per-channel affine y = a * x + b (see ``_affine``). Then:

- BN after a linear (Conv, Gemm, MatMul [+ Add bias]) whose output only the site reads:
  scale the linear's output channels by a, bias' = bias * a + b.
- BN before linears (RepBN's placement: before qkv, fc1 and the head): every reader of the
  site, possibly through ops that commute with a per-channel affine, must be a linear reading
  the channel axis as its input features: scale their input rows by a, bias' = bias + b @ W.

New weights are computed in float64, cast back to the weight's dtype and stored as new
initializers, so tied weights read elsewhere are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, consumers
from effc.passes import _rescale as rescale
from effc.passes._affine import AffineSite, affine_site
from effc.passes._op_semantics import AFFINE, ELEMENTWISE, PERMUTE, RESHAPE, TABLE, indexes_axis, ops_with, refusal
from effc.passes._stream_axes import reshaped_axis, shape_of
from effc.passes.base import Pass, PassContext, PassOutcome

# Ops a per-channel affine moves across bit for bit (see _op_semantics). Walking back to the
# producer: only those that keep every element (a selection would leave linear outputs the BN
# never saw); walking on to the readers also selections that leave the channel axis whole.
_RESHAPES = ops_with(axes=(RESHAPE,))
_CHANNEL_KEEPING = ops_with(AFFINE, exact=True, axes=(ELEMENTWISE, PERMUTE, RESHAPE))
_LINEARS = ("MatMul", "Gemm", "Conv")


@dataclass
class _Fold:
    linear: ir.Node
    apply: Callable[[], ir.Value | None]  # for a fold into the producer: the value now holding a*x+b


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "Fold inference BatchNorm and RepBN (BN(x) + alpha*x) into the adjacent Conv/Gemm/MatMul"
    exact = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        outcome = PassOutcome()
        graph = model.graph
        for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
            site = affine_site(bn)
            if isinstance(site, str):
                outcome.skip(bn, site)
                continue
            into_producer = _producer_fold(site)
            if isinstance(into_producer, _Fold):
                folded = into_producer.apply()
                for y in site.outputs:
                    rescale.redirect(y, folded)
                _record(outcome, site, into_producer.linear, "fold-after")
            else:
                into_readers = _reader_folds(site)
                if isinstance(into_readers, str):
                    outcome.skip(bn, f"into its input's producer: {into_producer}; into its readers: {into_readers}")
                    continue
                for fold in into_readers:
                    fold.apply()
                    _record(outcome, site, fold.linear, "fold-before")
                for y in site.outputs:
                    y.replace_all_uses_with(site.source)
            graph.remove(site.nodes, safe=True)
        if outcome.rewrites:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return outcome


def _record(outcome: PassOutcome, site: AffineSite, linear: ir.Node, action: str) -> None:
    """fold-after: into the linear producing the BN's input; fold-before: into a linear reading its output."""
    outcome.rewrite(site.bn, action, site=site.label, repbn=site.repbn, into=linear.name, into_op=linear.op_type)


# --- BN after a linear: fold into the producer of the site's input --------------------------

def _producer_fold(site: AffineSite) -> _Fold | str:
    found = _producing_linear(site)
    if isinstance(found, str):
        return found
    linear, axis, rank, chain = found
    if sum(y.is_graph_output() for y in site.outputs) > 1:
        return "several outputs are graph outputs"
    fold = _linear_output_fold(linear, axis, rank, site)
    if isinstance(fold, str) or not chain:
        return fold

    def apply() -> ir.Value:
        fold.apply()
        _skip_round_trips(site, chain)
        return site.source  # a*x+b leaves the linear and flows through the chain to the BN's input

    return _Fold(fold.linear, apply)


def _skip_round_trips(site: AffineSite, chain: list[ir.Node]) -> None:
    """Read the linear's output directly where a reshape after the BN undoes the chain before it
    (``bn(h.flatten(0, 1)).reshape_as(h)``): both reshapes are dead once the BN is gone."""
    if any(node.op_type == "Transpose" for node in chain):
        return  # only pure reshapes keep the row-major order of the elements
    start = chain[-1].inputs[0]
    for y in site.outputs:
        readers = consumers(y)
        if y.is_graph_output() or len(readers) != 1 or readers[0].op_type not in _RESHAPES:
            continue
        back = readers[0].outputs[0]
        if _same_static_shape(shape_of(back), shape_of(start)):
            rescale.redirect(back, start)


def _producing_linear(site: AffineSite) -> tuple[ir.Node, int, int | None, list[ir.Node]] | str:
    """The op computing the site's input, looking through ops that keep every element's channel
    (reshapes that keep the channel axis, e.g. torch's BatchNorm1d on ``linear(x).flatten(0, 1)``):
    (that op, channel axis and rank of its output, the ops passed through)."""
    value, axis, rank, chain = site.source, site.axis, site.rank, []
    node = value.producer()
    if node is None:
        return "input is a graph input"
    if value.is_graph_output() or any(reader not in site.nodes for reader in consumers(value)):
        return f"{_describe(node)} output has other readers"
    while node is not None and node.op_type in _CHANNEL_KEEPING:
        moved = _back_through(node, value, axis, rank)
        if isinstance(moved, str):
            return moved
        value, (axis, rank) = node.inputs[0], moved
        chain.append(node)
        if value.is_graph_output() or consumers(value) != [node]:
            return f"{_describe(node)} input has other readers"
        node = value.producer()
    if node is None:
        return "input is a graph input" if not chain else f"{_describe(chain[-1])} reads a graph input"
    if node.op_type in TABLE:
        reason = refusal(node, AFFINE, exact=True) or "a selection is not followed back to its producer"
        return f"input comes from {_describe(node)}, which the affine cannot cross: {reason}"
    return node, axis, rank, chain


def _back_through(node: ir.Node, value: ir.Value, axis: int, rank: int | None) -> tuple[int, int] | str:
    """Channel axis and rank of ``node``'s input, given those of its output ``value``; else a reason."""
    name = _describe(node)
    if value is not node.outputs[0] or len(node.inputs) == 0 or node.inputs[0] is None:
        return f"input comes from a side output of {name}"
    reason = refusal(node, AFFINE, exact=True)
    if reason:
        return f"{name}: {reason}"
    if TABLE[node.op_type].axis == ELEMENTWISE:
        return axis, rank
    if rank is None:
        return f"unknown rank after {name}"
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None) or list(reversed(range(rank)))
        return perm[axis], rank
    return _reshaped(node, value, node.inputs[0], axis, rank)


def _reshaped(node: ir.Node, src: ir.Value, dst: ir.Value, axis: int, rank: int) -> tuple[int, int] | str:
    """Where ``axis`` of ``src`` is in ``dst`` (the other side of a Reshape-like ``node``, its input
    or its output), and ``dst``'s rank, if the node keeps every element's channel.

    A row-major reshape keeps every element's channel when the channel dimension keeps its size
    and the elements after it (the product of the later dimensions) stay as many.
    """
    source, target = shape_of(src), shape_of(dst)
    if source is None or target is None or len(source) != rank:
        return f"unknown shapes around {_describe(node)}"
    mapped = reshaped_axis(target, source, axis - rank)
    if mapped is None:
        return f"{_describe(node)} moves the channel axis ({_dims(source)} -> {_dims(target)})"
    return mapped + len(target), len(target)


def _linear_output_fold(linear: ir.Node, axis: int, rank: int | None, site: AffineSite) -> _Fold | str:
    """Fold the site's affine into ``linear``, whose output holds the channels on ``axis``."""
    a, b = site.scale, site.shift
    op = linear.op_type
    if op == "Conv":
        if axis != 1:
            return f"channel axis {axis} is not the Conv's output-channel axis"
        weight, bias = _weights(linear, 0, site.channels)
        if isinstance(weight, str):
            return weight
        return _Fold(linear, lambda: rescale.scale_conv_outputs(linear, weight, bias, a, b))
    if op == "Gemm":
        if axis != 1:
            return f"channel axis {axis} is not the Gemm's output axis"
        weight, bias = _weights(linear, 0 if linear.attributes.get_int("transB", 0) else 1, site.channels)
        if isinstance(weight, str):
            return weight
        return _Fold(linear, lambda: rescale.scale_gemm_outputs(linear, weight, bias, a, b))
    if op not in ("MatMul", "Add"):
        return f"input comes from {_describe(linear)}, not a linear"
    if rank is None or axis != rank - 1:
        return f"{_describe(linear)} output channel axis is not the BN channel axis"
    if op == "MatMul":
        weight = _matmul_weight(linear, 1, site.channels)
        if isinstance(weight, str):
            return weight
        return _Fold(linear, lambda: rescale.scale_matmul_outputs(linear, weight, a, b))
    return _biased_matmul_fold(linear, a, b)


def _biased_matmul_fold(add: ir.Node, a: np.ndarray, b: np.ndarray) -> _Fold | str:
    for index in (0, 1):
        matmul = add.inputs[index].producer() if add.inputs[index] is not None else None
        bias = const_value(add.inputs[1 - index])
        if matmul is None or matmul.op_type != "MatMul" or bias is None:
            continue
        if add.inputs[index].is_graph_output() or consumers(add.inputs[index]) != [add]:
            return f"{_describe(matmul)} output has other readers"
        weight = _matmul_weight(matmul, 1, len(a))
        if isinstance(weight, str):
            return weight

        def apply(matmul=matmul, weight=weight, bias=bias, index=index) -> ir.Value:
            rescale.scale_matmul_outputs(matmul, weight, a, None)
            return rescale.scale_bias_add(add, 1 - index, bias, a, b)

        return _Fold(matmul, apply)
    return f"input comes from {_describe(add)}, not MatMul + constant bias"


# --- BN before linears: fold into every reader ------------------------------------------------

def _reader_folds(site: AffineSite) -> list[_Fold] | str:
    folds: list[_Fold] = []
    for y in site.outputs:
        reason = _collect(y, site.axis, site.rank, site, folds)
        if reason:
            return reason
    return folds or "its output is unused"


def _collect(value: ir.Value, axis: int, rank: int | None, site: AffineSite, folds: list[_Fold]) -> str | None:
    """Append a fold for every linear reading ``value``; a reason if some reader is not one."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    uses = list(value.uses())
    others = sorted({node.op_type for node, _ in uses if node.op_type not in TABLE and node.op_type not in _LINEARS})
    if others:
        return f"other consumers: {', '.join(others)}"
    for node, index in uses:
        if node.op_type in TABLE:
            step = _through(node, index, axis, rank)
            if isinstance(step, str):
                return step
            reason = _collect(node.outputs[0], *step, site, folds)
        else:
            reason = _reader_fold(node, index, axis, rank, site, folds)
        if reason:
            return reason
    return None


def _through(node: ir.Node, index: int, axis: int, rank: int | None) -> tuple[int, int | None] | str:
    """Channel axis and rank after ``node`` if it commutes with the affine, else a reason."""
    op, name = node.op_type, _describe(node)
    if index != 0:
        return f"{name} reads it as a parameter"
    reason = refusal(node, AFFINE, exact=True)
    if reason:
        return f"{name} between the BN and its readers: {reason}"
    kind = TABLE[op].axis
    if kind == ELEMENTWISE:
        return axis, rank
    if rank is None:
        return f"unknown rank before {name}"
    if kind == PERMUTE:
        perm = node.attributes.get_ints("perm", None) or list(reversed(range(rank)))
        return list(perm).index(axis), rank
    if kind == RESHAPE:
        return _reshaped(node, node.inputs[0], node.outputs[0], axis, rank)
    reason = indexes_axis(node, axis, rank)
    if reason:
        return f"{name}: {reason}"
    if op == "Gather":
        indices = node.inputs[1]
        if indices.shape is None:
            return f"unknown indices rank in {name}"
        gathered = node.attributes.get_int("axis", 0) % rank
        return (axis if axis < gathered else axis - 1 + len(indices.shape)), rank - 1 + len(indices.shape)
    return axis, rank  # Slice


def _reader_fold(node: ir.Node, index: int, axis: int, rank: int | None, site: AffineSite,
                 folds: list[_Fold]) -> str | None:
    name, a, b = _describe(node), site.scale, site.shift
    if index != 0:
        return f"{name} reads it as its weight"
    if node.op_type == "MatMul":
        if rank is None or axis != rank - 1 or rank < 2:
            return f"channel axis is not the reduction axis of {name}"
        weight = _matmul_weight(node, 0, site.channels)
        if isinstance(weight, str):
            return weight
        folds.append(_Fold(node, lambda: rescale.scale_matmul_inputs(node, weight, a, b)))
        return None
    if axis != 1:
        return f"channel axis {axis} is not the input-channel axis of {name}"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return f"{name} has transA=1"
    if node.op_type == "Conv":
        # Zero padding would see the affine's offset b at the border; a grouped conv spreads
        # input channels over groups.
        pads = node.attributes.get_ints("pads", None) or []
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            return f"padding {list(pads) if any(pads) else auto_pad} on {name}"
        if node.attributes.get_int("group", 1) != 1:
            return f"{name} is grouped (group={node.attributes.get_int('group', 1)})"
    in_axis = 1 if node.op_type == "Conv" or node.attributes.get_int("transB", 0) else 0
    weight, bias = _weights(node, in_axis, site.channels)
    if isinstance(weight, str):
        return weight
    scale = rescale.scale_conv_inputs if node.op_type == "Conv" else rescale.scale_gemm_inputs
    folds.append(_Fold(node, lambda: scale(node, weight, bias, a, b)))
    return None


# --- shared helpers ---------------------------------------------------------------------------

def _weights(node: ir.Node, axis: int, channels: int) -> tuple[np.ndarray | str, np.ndarray | None]:
    """Constant weight (input 1, ``channels`` on ``axis``) and optional constant bias of a Conv or Gemm."""
    weight = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return f"weight of {_describe(node)} is not constant", None
    weight = _check_channels(node, weight, axis, channels)
    if isinstance(weight, str):
        return weight, None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias = const_value(node.inputs[2]) if has_bias else None
    if has_bias and bias is None:
        return f"bias of {_describe(node)} is not constant", None
    return weight, bias


def _matmul_weight(matmul: ir.Node, axis: int, channels: int) -> np.ndarray | str:
    """The constant 2-D weight of a MatMul whose ``axis`` (0: inputs, 1: outputs) has ``channels``."""
    weight = const_value(matmul.inputs[1])
    if weight is None:
        return f"weight of {_describe(matmul)} is not constant"
    if weight.ndim != 2:
        return f"weight of {_describe(matmul)} is {weight.ndim}-D, not 2-D"
    return _check_channels(matmul, weight, axis, channels)


def _check_channels(node: ir.Node, weight: np.ndarray, axis: int, channels: int) -> np.ndarray | str:
    if weight.shape[axis] != channels:
        return f"weight of {_describe(node)} has {weight.shape[axis]} channels on axis {axis}, BN has {channels}"
    return weight


def _same_static_shape(a: list | None, b: list | None) -> bool:
    """Whether two shapes are provably equal: the same integers, or the same named dimensions."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x == y if isinstance(x, int) and isinstance(y, int)
               else not isinstance(x, int) and not isinstance(y, int) and x.value is not None and str(x) == str(y)
               for x, y in zip(a, b))


def _dims(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'"
