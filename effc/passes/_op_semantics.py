"""What each ONNX op does to a per-channel quantity: one table, asked by property.

Three analyses walk through ops that stand between the values they care about, and each asks
its own question, so each asks for a property rather than keeping its own list of ops:

- shift-add's layer protection (``_linears``): does a linear behind this op still read the
  model's input, or write its output? -> MOVES_DATA.
- layernorm-to-rmsnorm's stream proof (``_stream_axes``, ``_residual_stream``): does a value that
  is zero-mean over the hidden axis stay so, and can a per-channel scale (LayerScale) move
  across the op into the stream's writers? -> ZERO_MEAN, SCALE.
- fold-batchnorm: does a per-channel affine a * x + b move across the op unchanged, bit for bit
  (the pass is exact)? -> AFFINE with ``exact``.

The answers differ on purpose: Neg keeps a value zero-mean and commutes with a scale, but
-(a x + b) = a (-x) - b flips the offset; Cast keeps the value (to a float type) but rounds,
so a fold across it is not exact; Gather and Slice commute only while they do not index the
channel axis; Dropout is the identity only in inference mode.

Where the channel axis goes across an op is the walking pass's business (its axes are its own:
forward or backward, negative or not); ``axis`` only says which kind of mapping the op needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from effc.ir import const_value

MOVES_DATA = "moves data only"  # every output element is one input element (moved, selected, re-typed)
SCALE = "commutes with a per-channel scale"  # f(a * x) == a * f(x)
AFFINE = "commutes with a per-channel affine"  # f(a * x + b) == a * f(x) + b
ZERO_MEAN = "keeps a zero-mean value zero-mean"
PROPERTIES = (MOVES_DATA, SCALE, AFFINE, ZERO_MEAN)

# How the channel axis crosses the op.
ELEMENTWISE, PERMUTE, RESHAPE, SELECT = "elementwise", "permute", "reshape", "select"


@dataclass(frozen=True)
class OpSemantics:
    props: frozenset[str]
    axis: str = ELEMENTWISE
    exact: bool = True  # the properties hold bit for bit in floating point
    inexact_why: str = ""
    # When the properties hold at all (None: always); returns why not.
    condition: Callable[[ir.Node], str | None] | None = None
    # SELECT ops: the axes (non-negative, for input rank ``rank``) the op indexes, or why unknown.
    indexed_axes: Callable[[ir.Node, int], set[int] | str] | None = None
    why_not: dict[str, str] = field(default_factory=dict)  # why a property is absent


def _inference_dropout(node: ir.Node) -> str | None:
    inputs = node.inputs
    training = const_value(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else False
    if training is None or bool(np.any(training)):
        return "it may run in training mode"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "its mask is read"
    return None


def _to_float(node: ir.Node) -> str | None:
    if not ir.DataType(node.attributes.get_int("to", 0)).is_floating_point():
        return "it casts to a non-float type"
    return None


def _gather_axes(node: ir.Node, rank: int) -> set[int] | str:
    return {node.attributes.get_int("axis", 0) % rank}


def _slice_axes(node: ir.Node, rank: int) -> set[int] | str:
    given = len(node.inputs) > 3 and node.inputs[3] is not None
    axes = const_value(node.inputs[3]) if given else None
    if axes is None:
        starts = node.inputs[1]
        if given or starts.shape is None:
            return "its axes are unknown"
        axes = np.arange(starts.shape[0])
    return {int(a) % rank for a in axes.reshape(-1)}


# A pure data movement commutes with everything per-channel and keeps the mean (a selection: while
# it keeps the channel axis whole, see ``indexes_axis``).
_MOVES = frozenset(PROPERTIES)

TABLE: dict[str, OpSemantics] = {
    "Identity": OpSemantics(_MOVES),
    "Dropout": OpSemantics(_MOVES, condition=_inference_dropout),
    "Cast": OpSemantics(_MOVES, condition=_to_float, exact=False,
                        inexact_why="it changes the float type, so a fold across it computes the affine in another "
                                    "precision (it rounds differently)"),
    "Neg": OpSemantics(frozenset({SCALE, ZERO_MEAN}),
                       why_not={AFFINE: "it flips the sign of the affine's offset",
                                MOVES_DATA: "it computes a new value"}),
    "Transpose": OpSemantics(_MOVES, axis=PERMUTE),
    **{op: OpSemantics(_MOVES, axis=RESHAPE) for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
    "Gather": OpSemantics(_MOVES, axis=SELECT, indexed_axes=_gather_axes),
    "Slice": OpSemantics(_MOVES, axis=SELECT, indexed_axes=_slice_axes),
}


def ops_with(*props: str, exact: bool = False, axes: tuple[str, ...] | None = None) -> frozenset[str]:
    """The op types that have every one of ``props`` (bit-exactly if ``exact``; with an axis kind in ``axes``)."""
    return frozenset(op for op, s in TABLE.items()
                     if set(props) <= s.props and (s.exact or not exact) and (axes is None or s.axis in axes))


def refusal(node: ir.Node, prop: str, exact: bool = False) -> str | None:
    """Why ``node`` does not have ``prop`` (bit-exactly if ``exact``) here; None if it does.

    The channel axis itself is not checked: see ``indexes_axis`` for selections.
    """
    entry = TABLE.get(node.op_type)
    if entry is None or node.domain not in ("", "ai.onnx"):
        return f"{node.op_type} is not in the op-semantics table (not known to be one that {prop})"
    if prop not in entry.props:
        return entry.why_not.get(prop, f"it is not one that {prop}")
    if exact and not entry.exact:
        return entry.inexact_why
    return entry.condition(node) if entry.condition else None


def indexes_axis(node: ir.Node, axis: int, rank: int) -> str | None:
    """For a selection: why it does not keep channel ``axis`` (of its rank-``rank`` input) whole; else None."""
    entry = TABLE[node.op_type]
    if entry.indexed_axes is None:
        return None
    indexed = entry.indexed_axes(node, rank)
    if isinstance(indexed, str):
        return indexed
    return f"it indexes the channel axis {axis}" if axis % rank in indexed else None
