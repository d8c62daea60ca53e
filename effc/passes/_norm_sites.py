"""LayerNorm sites over the last axis: recognise them and rewrite them into RMSNorm form.

A site is either a ``LayerNormalization`` node or the decomposition older exporters emit::

    m = ReduceMean(x, -1); d = Sub(x, m); v = ReduceMean(Pow(d, 2) | Mul(d, d), -1)
    y = Div(d, Sqrt(Add(v, eps))) | Mul(d, Reciprocal(Sqrt(Add(v, eps))))  [-> Mul gamma] [-> Add beta]

Both only read the residual stream through a mean subtraction, which is why a zero-mean stream
lets the mean subtraction go (the RMS form) without changing any output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, new_initializer
from effc.passes.base import Rewrite

# Ops that normalise a vector; a stream written by one of them is a post-LN stream.
NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                      "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


@dataclass
class NormSite:
    """One LayerNorm over the last axis of ``x``.

    ``readers`` are the input slots through which the site reads ``x``; ``nodes`` are all the
    nodes that belong to the site (a stream written by one of them is post-LN).
    """

    name: str
    x: ir.Value
    readers: list[tuple[ir.Node, int]]
    nodes: list[ir.Node] = field(default_factory=list)
    node: ir.Node | None = None  # the LayerNormalization node (None for a decomposed site)
    centring: ir.Node | None = None  # the Sub(x, mean) of a decomposed site

    @property
    def output(self) -> ir.Value:
        """What the site writes: the LayerNorm's Y, or the decomposition's last node's output."""
        return self.nodes[-1].outputs[0]

    @property
    def label(self) -> str:
        if self.node is not None:
            return f"LayerNormalization '{self.name}'"
        return f"decomposed LayerNorm '{self.name}'"


def find_sites(graph: ir.Graph) -> tuple[list[NormSite], list[tuple[ir.Node, str]]]:
    """All LayerNorm sites of ``graph`` and the LayerNormalization nodes that cannot be sites."""
    sites: list[NormSite] = []
    rejected: list[tuple[ir.Node, str]] = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "LayerNormalization":
            reason = _layer_norm_problem(node)
            if reason:
                rejected.append((node, reason))
            else:
                name = node.name or node.outputs[0].name
                sites.append(NormSite(name, node.inputs[0], [(node, 0)], [node], node=node))
        elif node.op_type == "Sub":
            site = _decomposed_site(node)
            if site is not None:
                sites.append(site)
    return sites, rejected


def _layer_norm_problem(node: ir.Node) -> str | None:
    rank = _rank(node.inputs[0])
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"normalises from axis {axis}, not over the last axis only"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "its Mean/InvStdDev outputs are used"
    return None


def _decomposed_site(sub: ir.Node) -> NormSite | None:
    """The decomposed LayerNorm whose mean subtraction is ``sub``, if it is one."""
    x, mean = sub.inputs
    mean_node = mean.producer() if mean is not None else None
    if mean_node is None or not _is_last_axis_mean(mean_node) or mean_node.inputs[0] is not x:
        return None
    if len(mean.uses()) != 1 or mean.is_graph_output():
        return None
    d = sub.outputs[0]
    if d.is_graph_output():
        return None
    square = divide = None
    for user in {id(n): n for n, _ in d.uses()}.values():
        if _is_square_of(user, d):
            square = user
        elif (user.op_type == "Div" and user.inputs[0] is d) or (user.op_type == "Mul" and _other_input(user, d)):
            divide = user
        else:
            return None
    if square is None or divide is None:
        return None
    chain = _follow(square.outputs[0], ["ReduceMean", "Add", "Sqrt"])
    if chain is None or not _is_last_axis_mean(chain[0]):
        return None
    std = chain[-1].outputs[0]
    if divide.op_type == "Mul":
        reciprocal = _other_input(divide, d).producer()
        if reciprocal is None or reciprocal.op_type != "Reciprocal" or reciprocal.inputs[0] is not std:
            return None
        chain.append(reciprocal)
    elif divide.inputs[1] is not std:
        return None
    nodes = [mean_node, sub, square, *chain, divide, *_affine_tail(divide.outputs[0])]
    return NormSite(sub.name or d.name, x, [(mean_node, 0), (sub, 0)], nodes, centring=sub)


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a binary ``node`` that is not ``value`` (None unless exactly one input is)."""
    a, b = node.inputs[0], node.inputs[1]
    if (a is value) == (b is value):
        return None
    return b if a is value else a


def _affine_tail(value: ir.Value) -> list[ir.Node]:
    """The Mul gamma [-> Add beta] after the normalisation (part of the site for post-LN checks)."""
    tail = []
    for op in ("Mul", "Add"):
        users = value.consumers()
        if len(users) != 1 or users[0].op_type != op or const_value(_other_input(users[0], value)) is None:
            break
        tail.append(users[0])
        value = users[0].outputs[0]
    return tail


def _follow(value: ir.Value, ops: list[str]) -> list[ir.Node] | None:
    """The single-consumer chain of ``ops`` starting at ``value``."""
    chain = []
    for op in ops:
        users = value.consumers()
        if len(users) != 1 or users[0].op_type != op or value.is_graph_output():
            return None
        chain.append(users[0])
        value = users[0].outputs[0]
    return chain


def _is_square_of(node: ir.Node, d: ir.Value) -> bool:
    if node.op_type == "Mul":
        return node.inputs[0] is d and node.inputs[1] is d
    if node.op_type == "Pow" and node.inputs[0] is d:
        exponent = const_value(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0
    return False


def _is_last_axis_mean(node: ir.Node) -> bool:
    if node.op_type != "ReduceMean" or node.attributes.get_int("keepdims", 1) != 1:
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_value(node.inputs[1])
    else:
        attr = node.attributes.get("axes")
        axes = np.array(attr.value) if attr is not None else None
    if axes is None or axes.size != 1:
        return False
    axis = int(axes.reshape(()))
    rank = _rank(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


# --- rewriting a site -------------------------------------------------------------------------


def convert(site: NormSite, graph: ir.Graph, opset: int) -> Rewrite:
    """Rewrite ``site`` into its RMS form (valid once its input is zero-mean); returns the rewrite."""
    if site.node is None:
        # The decomposition already computes the RMS of d = x - mean; with mean == 0, d is x.
        sub = site.centring
        sub.outputs[0].replace_all_uses_with(sub.inputs[0])  # not site.x: a centring may now stand between
        graph.remove([sub, site.nodes[0]], safe=True)
        return Rewrite(site.name, "to-rms", {"site": site.label, "decomposed": True,
                                             "target": "RMS form (mean subtraction removed)", "beta": False})
    ln = site.node
    x, scale = ln.inputs[0], ln.inputs[1]
    bias = ln.inputs[2] if len(ln.inputs) > 2 else None
    if bias is not None and _all_zero(bias):
        bias = None  # adding a zero beta is a no-op; drop it
    epsilon = ln.attributes.get_float("epsilon", 1e-5)
    if opset >= 23:
        rms = ir.node("RMSNormalization", [x, scale], {"axis": -1, "epsilon": epsilon, "stash_type": 1},
                      name=f"{site.name}/rms")
        new_nodes, target = [rms], "RMSNormalization"
    else:
        stash_type = ln.attributes.get_int("stash_type", 1)
        new_nodes = _rms_decomposition(graph, site.name, x, scale, epsilon, opset, stash_type)
        target = "RMS decomposition"
    out = new_nodes[-1].outputs[0]
    out.type, out.shape = x.type, x.shape
    if bias is not None:
        add = ir.node("Add", [out, bias], name=f"{site.name}/beta")
        new_nodes.append(add)
        out = add.outputs[0]
    ir.convenience.replace_nodes_and_values(graph, ln, [ln], new_nodes, [ln.outputs[0]], [out])
    return Rewrite(site.name, "to-rms", {"site": site.label, "decomposed": False, "target": target,
                                         "beta": bias is not None})


def centre_output(site: NormSite, graph: ir.Graph, opset: int) -> Rewrite:
    """Make every reader of ``site``'s output read it minus its mean over the last axis.

    Used where the residual stream starts at this norm: a per-token shift, invisible to the
    LayerNorms that read the stream, which makes the stream zero-mean from its start.
    """
    y = site.output
    uses = list(y.uses())
    if opset >= 18:
        axes = new_initializer(graph, np.array([-1], np.int64), f"{site.name}/centre_axes")
        mean = ir.node("ReduceMean", [y, axes], {"keepdims": 1}, name=f"{site.name}/centre_mean")
    else:
        mean = ir.node("ReduceMean", [y], {"axes": [-1], "keepdims": 1}, name=f"{site.name}/centre_mean")
    sub = ir.node("Sub", [y, mean.outputs[0]], name=f"{site.name}/centre")
    sub.outputs[0].type, sub.outputs[0].shape = y.type, y.shape
    graph.insert_after(y.producer(), [mean, sub])
    for node, index in uses:
        node.replace_input_with(index, sub.outputs[0])
    return Rewrite(site.name, "centre-stream-start", {"site": site.label, "output": y.name})


def _rms_decomposition(graph: ir.Graph, name: str, x: ir.Value, scale: ir.Value, epsilon: float,
                       opset: int, stash_type: int) -> list[ir.Node]:
    """x / sqrt(mean(x^2, -1) + eps) * scale from opset-13 ops (stats in float32 for 16-bit inputs)."""
    dtype = x.dtype or ir.DataType.FLOAT
    wide = stash_type == 1 and dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    np_stat = np.float32 if wide else dtype.numpy()
    nodes: list[ir.Node] = []

    def add(op, inputs, attributes=None):
        nodes.append(ir.node(op, inputs, attributes, name=f"{name}/{op.lower()}_{len(nodes)}"))
        return nodes[-1].outputs[0]

    xs = add("Cast", [x], {"to": ir.DataType.FLOAT}) if wide else x
    square = add("Pow", [xs, new_initializer(graph, np.array(2.0, np_stat), f"{name}/two")])
    if opset >= 18:
        axes = new_initializer(graph, np.array([-1], np.int64), f"{name}/axes")
        mean_square = add("ReduceMean", [square, axes], {"keepdims": 1})
    else:
        mean_square = add("ReduceMean", [square], {"axes": [-1], "keepdims": 1})
    shifted = add("Add", [mean_square, new_initializer(graph, np.array(epsilon, np_stat), f"{name}/epsilon")])
    normed = add("Div", [xs, add("Sqrt", [shifted])])
    if wide:
        normed = add("Cast", [normed], {"to": dtype})
    add("Mul", [normed, scale])
    return nodes


def _all_zero(value: ir.Value) -> bool:
    array = const_value(value)
    return array is not None and not np.any(array)
