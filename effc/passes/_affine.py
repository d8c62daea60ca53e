"""Canonicalise an inference BatchNormalization site to a per-channel affine y = a * x + b.

A site is what fold-batchnorm removes: the BN node, SLAB's RepBN residual ``BN(x) + alpha * x``
when present, and the ``Transpose(0,2,1)`` pair exporters wrap around BN for token tensors
[B, N, C]. Describing every variant as (source, outputs, channel axis, a, b) lets the folding
code handle them all with one set of rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from effc.ir import const_value, consumers

DEFAULT_EPSILON = 1e-5


@dataclass
class AffineSite:
    """``outputs`` each hold ``scale * source + shift``, broadcast along ``axis`` of ``source``."""

    bn: ir.Node
    source: ir.Value
    outputs: list[ir.Value]
    axis: int
    rank: int | None
    scale: np.ndarray  # a, float64 [C]
    shift: np.ndarray  # b, float64 [C]
    nodes: list[ir.Node]  # dead once every output is rewired
    repbn: bool

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    @property
    def label(self) -> str:
        return f"BatchNormalization '{self.bn.name}'" + (" (RepBN)" if self.repbn else "")


def affine_site(bn: ir.Node) -> AffineSite | str:
    """The affine a BN node computes, widened to RepBN and Transpose pairs; a reason if none."""
    if bn.attributes.get_int("training_mode", 0) != 0:
        return "training_mode=1 (batch statistics, not a fixed affine)"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "its running-statistics outputs are read"
    params = []
    for value in bn.inputs[1:5]:
        array = const_value(value)
        if array is None:
            return f"non-constant BN parameters ({value.name if value is not None else 'missing'})"
        params.append(array.astype(np.float64).reshape(-1))
    gamma, beta, mean, var = params
    var_eps = var + bn.attributes.get_float("epsilon", DEFAULT_EPSILON)
    if np.any(var_eps <= 0):
        return "variance + epsilon is not positive"
    scale = gamma / np.sqrt(var_eps)
    shift = beta - mean * scale

    x = bn.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    site = AffineSite(bn, x, [bn.outputs[0]], 1, rank, scale, shift, [bn], repbn=False)
    _absorb_repbn(site)
    _unwrap_transposes(site)
    return site


def _absorb_repbn(site: AffineSite) -> None:
    """Widen ``BN(x)`` to ``Add(BN(x), Mul(x, alpha))`` (either operand order): a = s + alpha."""
    y = site.outputs[0]
    readers = consumers(y)
    if y.is_graph_output() or len(readers) != 1 or readers[0].op_type != "Add":
        return
    add = readers[0]
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    mul = other.producer() if other is not None else None
    if mul is None or mul.op_type != "Mul" or other.is_graph_output() or consumers(other) != [add]:
        return
    if mul.inputs[0] is site.source:
        alpha = const_value(mul.inputs[1])
    elif mul.inputs[1] is site.source:
        alpha = const_value(mul.inputs[0])
    else:
        return
    alpha = _per_channel(alpha, site.rank, site.axis, site.channels)
    if alpha is None:
        return
    site.scale = site.scale + alpha
    site.outputs = [add.outputs[0]]
    site.nodes += [mul, add]
    site.repbn = True


def _per_channel(alpha: np.ndarray | None, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``alpha`` as a [C] vector if it broadcasts per channel (scalar or only ``axis`` > 1)."""
    if alpha is None:
        return None
    alpha = alpha.astype(np.float64)
    if alpha.size == 1:
        return np.full(channels, alpha.reshape(()))
    if rank is None or alpha.ndim > rank:
        return None
    shape = (1,) * (rank - alpha.ndim) + alpha.shape
    if shape[axis] != channels or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return alpha.reshape(-1)


def _transpose_perm(node: ir.Node, rank: int | None) -> list[int] | None:
    perm = node.attributes.get_ints("perm", None)
    if perm is not None:
        return list(perm)
    return list(reversed(range(rank))) if rank is not None else None


def _unwrap_transposes(site: AffineSite) -> None:
    """Absorb ``Transpose(P)`` before the site and ``Transpose(P^-1)`` after every output.

    The affine then acts on the un-transposed tensor along axis P[1], and folding it away
    removes the transposes too.
    """
    x = site.source
    t1 = x.producer()
    if t1 is None or t1.op_type != "Transpose" or x.is_graph_output():
        return
    perm = _transpose_perm(t1, site.rank)
    if perm is None or any(reader not in site.nodes for reader in consumers(x)):
        return
    inverse = list(np.argsort(perm))
    closing: list[ir.Node] = []
    for y in site.outputs:
        readers = consumers(y)
        if y.is_graph_output() or not readers:
            return
        for reader in readers:
            if reader.op_type != "Transpose" or _transpose_perm(reader, site.rank) != inverse:
                return
        closing += readers
    site.source = t1.inputs[0]
    site.axis = perm[site.axis]
    site.outputs = [t.outputs[0] for t in closing]
    site.nodes = [t1, *site.nodes, *closing]
