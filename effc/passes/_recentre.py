"""Constant edits that make a writer's output zero-mean: fold a LayerScale in, then recentre.

An :class:`Edit` is planned per input slot (node, index). Slots that read the same constant
with the same edit share one new initializer (a :class:`Replacement`); readers outside the walk
keep the original, which is how a tied embedding / LM head gets untied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, new_initializer
from effc.passes.base import Rewrite
from effc.passes._tied_correction import correct_heads, correctable_heads

# How a writer's constant input is called in the rewrite text.
_ROLES = {("MatMul", 1): "weight", ("Gemm", 1): "weight", ("Gemm", 2): "bias", ("Conv", 1): "weight",
          ("Conv", 2): "bias", ("Gather", 0): "table"}


@dataclass
class Edit:
    """The planned change of one constant input slot: scale (LayerScale folding), then recentre.

    Axes are axes of the constant's array; a negative axis the array lacks (a broadcast operand)
    means the constant is the same for every channel, and its zero-mean version is zero.
    """

    node: ir.Node
    index: int
    centre_axes: set[int] = field(default_factory=set)
    scale: tuple[int, np.ndarray, ir.Node] | None = None  # (array axis, per-channel vector, the Mul)

    @property
    def key(self) -> tuple:
        return (id(self.node.inputs[self.index]), tuple(sorted(self.centre_axes)),
                id(self.scale[2]) if self.scale else None)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The edited array: computed in float64 (the mean too), stored in the weight's dtype."""
        result = array
        if self.scale is not None:
            axis, vector, _ = self.scale
            result = array.astype(np.float64) * _along(vector.astype(np.float64), axis, array.ndim)
        for axis in sorted(self.centre_axes):
            if (axis < 0 and result.ndim < -axis) or result.shape[axis] == 1:
                result = np.zeros(result.shape, np.float64)
            else:
                result = result - result.mean(axis=axis, keepdims=True, dtype=np.float64)
        return result.astype(array.dtype)


@dataclass
class Replacement:
    """A constant and the new array its ``edits`` slots read instead; ``outside`` keep the original."""

    value: ir.Value
    array: np.ndarray
    edits: list[Edit]
    outside: list[str]


def plan_replacements(edits: list[Edit]) -> list[Replacement]:
    """Group edits by constant and transform, computing each new array once; no-ops are dropped."""
    groups: dict[tuple, list[Edit]] = {}
    for edit in edits:
        groups.setdefault(edit.key, []).append(edit)
    edited = {(id(e.node), e.index) for e in edits}
    replacements = []
    for group in groups.values():
        value = group[0].node.inputs[group[0].index]
        original = const_value(value)
        array = group[0].apply(original)
        if array.shape == original.shape and np.array_equal(array, original):
            continue
        outside = [f"{n.op_type} '{n.name}'" for n, i in value.uses() if (id(n), i) not in edited]
        outside += ["a graph output"] if value.is_graph_output() else []
        replacements.append(Replacement(value, array, group, outside))
    return replacements


def install(graph: ir.Graph, replacements: list[Replacement]) -> list[Rewrite]:
    """Point the edited slots at their new constants; one rewrite per changed node and per untying."""
    changed: dict[int, tuple[ir.Node, list[dict]]] = {}
    untied: dict[str, list[str]] = {}
    kept_tied: list[Rewrite] = []
    for r in replacements:
        new_value = new_initializer(graph, np.ascontiguousarray(r.array), f"{r.value.name}_centred")
        for edit in r.edits:
            edit.node.replace_input_with(edit.index, new_value)
            role = _ROLES.get((edit.node.op_type, edit.index), f"constant '{r.value.name}'")
            # zeroed: the constant was the same for every channel, so recentring left nothing
            changed.setdefault(id(edit.node), (edit.node, []))[1].append({"role": role, "zeroed": not np.any(r.array)})
        heads = correctable_heads(r) if r.outside else None
        if heads:
            correct_heads(graph, r.value, heads)
            for node, i in list(r.value.uses()):
                node.replace_input_with(i, new_value)
            kept_tied.append(Rewrite(r.value.name, "keep-tied", {"heads": [h.name for h in heads],
                                                                  "parameters": int(r.array.shape[0])}))
        elif r.outside:
            untied[r.value.name] = r.outside
    rewrites = [Rewrite(node.name, "recentre", {"op": node.op_type, "roles": roles})
                for node, roles in changed.values()]
    rewrites += [Rewrite(name, "untie", {"readers": readers}) for name, readers in untied.items()]
    return rewrites + kept_tied


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``vector`` shaped to broadcast along ``axis`` of a rank-``ndim`` array (negative: right-aligned)."""
    rank = max(ndim, -axis) if axis < 0 else ndim
    shape = [1] * rank
    shape[axis] = vector.size
    return vector.reshape(shape)
