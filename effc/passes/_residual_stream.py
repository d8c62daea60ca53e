"""Prove that what LayerNorms read is zero-mean over the hidden axis, and plan the edits that make it so.

Starting at each LayerNorm's input, a walk over producers asks "can this value be made zero-mean
along this axis?". Linear plumbing (residual Adds, Transpose, Reshape, Concat on another axis,
per-token scaling) passes the question on to its inputs; writers (MatMul, Gemm, Conv, Gather from
a constant table, constants) answer it by recentring a constant over the output features. Nothing
is edited here: the result is a :class:`StreamPlan` the pass applies only if every site is proven.

Every edit shifts stream values by a per-token constant, which is invisible to a LayerNorm but
not to anything else; so each value the walk visits may only be read by LayerNorm sites or by
the walk's own nodes, and a constant shared with other readers must be untied first.

A stream may start at a LayerNorm (a patch-embedding norm, CLIP's pre-norm): its output is not
zero-mean, so the plan subtracts its mean there (one explicit centring for the whole stream).
That is only done for a norm that reads no normalised stream itself and whose output only
LayerNorms and the walk read; otherwise the norm sits inside the stream, which is post-LN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.ir import const_value
from effc.passes._norm_sites import NORM_OPS, NormSite
from effc.passes._op_semantics import SCALE
from effc.passes._recentre import Edit, Replacement, plan_replacements
from effc.passes._stream_axes import (
    PLUMBING,
    SCALE_CARRIERS,
    WRITERS,
    extent_along,
    gather_source_axis,
    plumbing_axis,
    rank_of,
    writer_slots,
)
from effc.passes._tied_correction import correctable_heads

# Readers that only look at a value's shape, never its numbers.
SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass
class Step:
    """What making one value zero-mean takes: zero-mean inputs, constant edits, or a reason it cannot."""

    error: str | None = None
    children: list[tuple[ir.Value, int]] = field(default_factory=list)
    uses: list[tuple[ir.Node, int]] = field(default_factory=list)  # input slots carrying the stream
    centres: list[tuple[ir.Node, int, int]] = field(default_factory=list)  # (node, input, array axis)
    scales: list[tuple[ir.Node, int, int, ir.Node]] = field(default_factory=list)  # ... + LayerScale Mul
    bypass: list[tuple[ir.Node, int]] = field(default_factory=list)  # LayerScale Mul, its stream input
    starts: list[NormSite] = field(default_factory=list)  # LayerNorm sites whose output starts the stream


@dataclass
class StreamPlan:
    failures: list[str | None]  # per site, the reason it cannot be converted
    replacements: list[Replacement]  # constants to recentre
    bypass: list[tuple[ir.Node, int]]  # LayerScale Muls (folded) and their stream input
    starts: list[NormSite]  # sites whose output starts the stream: centre it explicitly


@dataclass
class _Closure:
    values: dict[int, tuple[ir.Value, int]] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    constants: set[str] = field(default_factory=set)  # names of the constants it edits


class ResidualStream:
    """Plans the zero-mean proof for a set of LayerNorm sites of one graph."""

    def __init__(self, sites: list[NormSite], untie: bool = True):
        self.sites = sites
        self.untie = untie
        self._norm_nodes = {id(n) for site in sites for n in site.nodes}
        self._site_by_output = {id(site.output): site for site in sites}
        self._steps: dict[tuple[int, int], Step] = {}

    def plan(self) -> StreamPlan:
        closures = [self._closure(site.x, -1) for site in self.sites]
        allowed = {(id(n), i) for site in self.sites for n, i in site.readers}
        allowed |= {(id(n), i) for c in closures for step in c.steps for n, i in step.uses}
        axes: dict[int, set[int]] = {}
        for c in closures:
            for key, (_, axis) in c.values.items():
                axes.setdefault(key, set()).add(axis)
        replacements = plan_replacements(_merge_edits(closures))
        # ties the head correction keeps (see _tied_correction) need no copy, so untie=False allows them
        tied = {r.value.name: r.outside for r in replacements if r.outside and not correctable_heads(r)}
        own = {id(site): c for site, c in zip(self.sites, closures)}
        starts = {id(site.output): site for c in closures for step in c.steps for site in step.starts}
        failures = []
        for c in closures:
            errors = list(c.errors)
            errors += [_start_problem(site, own[id(site)], allowed) for step in c.steps for site in step.starts]
            for key, (value, _) in c.values.items():
                if len(axes[key]) > 1:
                    errors.append(_two_axes(value))
                reader = None if key in starts else _reader_problem(value, allowed)  # see _start_problem
                problem = reader or _sibling_problem(value, axes)
                if problem:
                    errors.append(problem)
            if not self.untie:
                errors += [f"tied weight '{name}' is shared with {readers[0]} (untie=False)"
                           for name, readers in tied.items() if name in c.constants]
            errors = [e for e in errors if e]
            post_ln = [e for e in errors if "post-LN" in e]
            failures.append((post_ln or errors or [None])[0])
        bypass = {id(m): (m, i) for c in closures for step in c.steps for m, i in step.bypass}
        return StreamPlan(failures, replacements, list(bypass.values()), list(starts.values()))

    # --- the walk -----------------------------------------------------------------------------

    def _closure(self, value: ir.Value, axis: int) -> _Closure:
        closure = _Closure()
        stack = [(value, axis)]
        while stack:
            value, axis = stack.pop()
            seen = closure.values.get(id(value))
            if seen is not None:
                if seen[1] != axis:
                    closure.errors.append(_two_axes(value))
                continue
            closure.values[id(value)] = (value, axis)
            step = self._step(value, axis)
            closure.steps.append(step)
            if step.error:
                closure.errors.append(step.error)
            closure.constants |= {n.inputs[i].name for n, i, *_ in step.centres + step.scales}
            stack.extend(reversed(step.children))
        return closure

    def _step(self, value: ir.Value, axis: int) -> Step:
        key = (id(value), axis)
        if key not in self._steps:
            step = Step()
            step.error = self._expand(step, value, axis)
            self._steps[key] = step
        return self._steps[key]

    def _expand(self, step: Step, value: ir.Value, axis: int) -> str | None:
        node = value.producer()
        if node is None:
            return f"writer '{value.name}' (graph input) cannot be recentred"
        rank = rank_of(value)
        if rank is not None and rank < -axis:
            return f"stream value '{value.name}' has no axis {axis}"
        if id(node) in self._norm_nodes or node.op_type in NORM_OPS:
            return self._norm_writer(step, node, value, axis)
        handler = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            return _cannot(node)
        return handler(self, step, node, value, axis)

    def _norm_writer(self, step: Step, node: ir.Node, value: ir.Value, axis: int) -> str | None:
        """A norm writes the stream: a LayerNorm site's output can start it (see _start_problem)."""
        site = self._site_by_output.get(id(value))
        if site is None and id(node) in self._norm_nodes:
            return f"stream value '{value.name}' is read from inside a LayerNorm ({node.op_type} '{node.name}')"
        if site is None:
            return (f"stream value '{value.name}' is written by {node.op_type} '{node.name}', a norm this pass "
                    "does not convert (its output is not zero-mean)")
        if axis != -1:
            return (f"stream value '{value.name}' is written by {site.label} (zero-mean over its last axis "
                    f"once centred) but read as a stream over axis {axis}")
        step.starts.append(site)
        return None

    def _operand(self, step: Step, node: ir.Node, index: int, axis: int) -> str | None:
        """Input ``index`` of ``node`` must be zero-mean along ``axis`` (relative to that input)."""
        value = node.inputs[index]
        array = const_value(value)
        if array is None:
            step.children.append((value, axis))
            step.uses.append((node, index))
        elif not np.issubdtype(array.dtype, np.floating):
            return _cannot(node, f"constant '{value.name}' is not floating point")
        else:
            step.centres.append((node, index, axis))
        return None

    def _broadcast_operand(self, step: Step, node: ir.Node, index: int, axis: int) -> str | None:
        """An operand broadcast into the output: one that is the same for every channel must be a constant."""
        operand = node.inputs[index]
        extent = extent_along(operand, axis)
        if extent is None:
            return _cannot(node, f"the hidden dimension of '{operand.name}' is unknown")
        if extent == "per-token" and const_value(operand) is None:
            return _cannot(node, f"'{operand.name}' is the same for every channel but is not a constant")
        return self._operand(step, node, index, axis)

    def _through_plumbing(self, step, node, value, axis):
        mapped = plumbing_axis(node, value, axis)
        return _cannot(node, mapped) if isinstance(mapped, str) else self._operand(step, node, 0, mapped)

    def _through_sum(self, step, node, value, axis):  # Add, Sub
        return self._broadcast_operand(step, node, 0, axis) or self._broadcast_operand(step, node, 1, axis)

    def _through_expand(self, step, node, value, axis):
        return self._broadcast_operand(step, node, 0, axis)

    def _through_product(self, step, node, value, axis):  # Mul, Div
        extents = (extent_along(node.inputs[0], axis), extent_along(node.inputs[1], axis))
        if None in extents:
            return _cannot(node, "the hidden dimension of an input is unknown")
        if extents == ("full", "per-token"):
            return self._operand(step, node, 0, axis)  # x * s or x / s with s the same for every channel
        if node.op_type == "Mul" and extents == ("per-token", "full"):
            return self._operand(step, node, 1, axis)
        if node.op_type == "Mul" and extents == ("full", "full"):
            return self._layer_scale(step, node, axis)
        return _cannot(node, "it does not scale the stream by a per-token factor")

    def _through_concat(self, step, node, value, axis):
        rank = rank_of(value)
        if rank is None:
            return _cannot(node, "its rank is unknown")
        if node.attributes.get_int("axis", 0) % rank == rank + axis:
            return _cannot(node, "it concatenates along the hidden axis (each part would keep its own "
                                 "per-token shift)")
        for index in range(len(node.inputs)):
            reason = self._operand(step, node, index, axis)
            if reason:
                return reason
        return None

    def _through_slice(self, step, node, value, axis):  # Slice, Split: fine unless they cut the hidden axis
        rank = rank_of(value)
        if node.op_type == "Split":
            cut = [node.attributes.get_int("axis", 0)]
        elif len(node.inputs) > 3 and node.inputs[3] is not None:
            cut = const_value(node.inputs[3])
        else:
            cut = range(rank) if rank is not None else None
        if rank is None or cut is None:
            return _cannot(node, "its rank or axes are unknown")
        if (rank + axis) in {int(a) % rank for a in cut}:
            return _cannot(node, "it cuts the hidden axis")
        return self._operand(step, node, 0, axis)

    def _through_writer(self, step, node, value, axis):  # MatMul, Gemm, Conv, Gather
        if node.op_type == "Gather" and const_value(node.inputs[0]) is None:
            data_axis = gather_source_axis(node, axis)
            if data_axis is None:
                return _cannot(node, "it indexes along the hidden axis")
            return self._operand(step, node, 0, data_axis - rank_of(node.inputs[0]))
        slots = writer_slots(node, axis)
        if isinstance(slots, str):
            return _cannot(node, slots)
        for index, array_axis in slots:
            reason = (self._broadcast_operand if array_axis < 0 else self._operand)(step, node, index, array_axis)
            if reason:
                return reason
        return None

    def _layer_scale(self, step: Step, mul: ir.Node, axis: int) -> str | None:
        """x * gamma with a constant per-channel gamma: fold gamma into x's writers, then drop the Mul."""
        for index in (0, 1):
            gamma = const_value(mul.inputs[1 - index])
            if gamma is not None and const_value(mul.inputs[index]) is None:
                break
        else:
            return _cannot(mul, "neither factor is a constant per-channel scale")
        y, y_rank = mul.inputs[index], rank_of(mul.inputs[index])
        channel = gamma.ndim + axis
        if y_rank is None or gamma.ndim > y_rank or any(n != 1 for i, n in enumerate(gamma.shape) if i != channel):
            return _cannot(mul, "its constant factor is not a per-channel scale")
        scales: list[tuple[ir.Node, int, int, ir.Node]] = []
        reason = self._scale_chain(y, axis, mul, scales)
        if reason:
            return f"LayerScale Mul '{mul.name}' cannot be folded into its writers: {reason}"
        step.scales += scales
        step.bypass.append((mul, index))
        step.children.append((y, axis))
        step.uses.append((mul, index))
        return None

    def _scale_chain(self, value: ir.Value, axis: int, mul: ir.Node, scales: list) -> str | None:
        """Plan multiplying ``value`` by the per-channel scale of ``mul`` inside its linear writers."""
        if value.is_graph_output() or len(value.uses()) != 1:
            return f"'{value.name}' has other readers"
        node = value.producer()
        if node is None:
            return f"'{value.name}' is a graph input"
        if node.op_type in ("Add", "Sub"):
            slots: list[tuple[int, int]] | str = [(0, axis), (1, axis)]
        elif node.op_type in SCALE_CARRIERS:
            mapped = plumbing_axis(node, value, axis, SCALE)
            slots = mapped if isinstance(mapped, str) else [(0, mapped)]
        elif node.op_type in WRITERS and not (node.op_type == "Gather" and const_value(node.inputs[0]) is None):
            slots = writer_slots(node, axis)
        else:
            slots = "it is not a linear writer"
        if isinstance(slots, str):
            return f"{node.op_type} '{node.name}': {slots}"
        for index, array_axis in slots:
            operand = node.inputs[index]
            if const_value(operand) is not None:
                scales.append((node, index, array_axis, mul))
                continue
            if array_axis < 0 and extent_along(operand, array_axis) != "full":
                return f"'{operand.name}' is not a full-width stream operand"
            reason = self._scale_chain(operand, array_axis, mul, scales)
            if reason:
                return reason
        return None


def _merge_edits(closures: list[_Closure]) -> list[Edit]:
    """One Edit per constant input slot, however many sites asked for it."""
    edits: dict[tuple[int, int], Edit] = {}
    for c in closures:
        for step in c.steps:
            for node, index, axis in step.centres:
                edits.setdefault((id(node), index), Edit(node, index)).centre_axes.add(axis)
            for node, index, axis, mul in step.scales:
                gamma = next(const_value(v) for v in mul.inputs if const_value(v) is not None)
                edits.setdefault((id(node), index), Edit(node, index)).scale = (axis, gamma.reshape(-1), mul)
    return list(edits.values())


def _two_axes(value: ir.Value) -> str:
    return f"stream value '{value.name}' would have to be zero-mean over two different axes"


def _cannot(node: ir.Node, detail: str | None = None) -> str:
    text = f"writer '{node.name}' ({node.op_type}) cannot be recentred"
    return f"{text}: {detail}" if detail else text


def _reader_problem(value: ir.Value, allowed: set[tuple[int, int]]) -> str | None:
    reader = _other_reader(value, allowed)
    if reader == "a graph output":
        return f"stream value '{value.name}' is a graph output, read without a LayerNorm"
    return reader and f"stream value '{value.name}' is read by {reader} without a LayerNorm"


def _other_reader(value: ir.Value, allowed: set[tuple[int, int]]) -> str | None:
    """What reads ``value`` other than LayerNorm sites, the walk and shape queries, if anything."""
    if value.is_graph_output():
        return "a graph output"
    for node, index in value.uses():
        if (id(node), index) not in allowed and node.op_type not in SHAPE_READERS:
            return f"{node.op_type} '{node.name}'"
    return None


def _start_problem(site: NormSite, own: _Closure, allowed: set[tuple[int, int]]) -> str | None:
    """Why the stream may not start at ``site``'s output (centred there), if it may not.

    A norm that reads a normalised stream itself, or whose output blocks read directly, is a
    norm inside the stream: the model is post-LN and centring after every such norm gains nothing.
    """
    value = site.output
    inner = [s for step in own.steps for s in step.starts]
    if inner:
        return (f"post-LN: stream value '{value.name}' is written by {site.label}, which itself reads the "
                f"normalised stream '{inner[0].output.name}' of {inner[0].label}")
    reader = _other_reader(value, allowed)
    if reader:
        return (f"post-LN: stream value '{value.name}' is written by {site.label} and read by {reader} "
                "without a LayerNorm")
    return None


def _sibling_problem(value: ir.Value, stream: dict[int, set[int]]) -> str | None:
    """A node that passes the stream on through one output must not leak it through another (Split)."""
    node = value.producer()
    for out in node.outputs if node is not None else ():
        if out is not value and (out.uses() or out.is_graph_output()) and id(out) not in stream:
            return f"output '{out.name}' of {node.op_type} '{node.name}' carries the stream without a LayerNorm"
    return None


_HANDLERS = {
    **dict.fromkeys(PLUMBING, ResidualStream._through_plumbing),
    **dict.fromkeys(("Add", "Sub"), ResidualStream._through_sum),
    **dict.fromkeys(("Mul", "Div"), ResidualStream._through_product),
    **dict.fromkeys(("Slice", "Split"), ResidualStream._through_slice),
    **dict.fromkeys(WRITERS, ResidualStream._through_writer),
    "Expand": ResidualStream._through_expand,
    "Concat": ResidualStream._through_concat,
}
