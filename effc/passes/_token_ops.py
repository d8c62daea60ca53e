"""Standard-ONNX subgraphs that choose which tokens to keep (or merge) between two blocks.

Every function appends nodes through an :class:`Emitter` and works on static shapes: ``n`` tokens
in, ``m`` out, batch ``b``. Scores never see stale shape metadata; sizes are passed explicitly.

- importance scores: ``attention_received`` (topk), ``pagerank`` (Zero-TPrune's I-stage);
- ``redundancy_drop``: Zero-TPrune's S-stage on top of an importance score;
- ``keep_top``: the indices of the ``m`` highest scores in ascending token order;
- ``bipartite_merge``: ToMe's matching of even to odd tokens as a merge matrix M [b, m, n].

Selection is by rank, not by TopK: rank_i = #{j : s_j > s_i, or s_j = s_i and j < i} (an n x n
comparison, ties broken by position), the kept tokens' output rows come from a running count
(a MatMul with a triangular 0/1 matrix). Every op is elementwise, a reduction or a MatMul, which
effc's codegen schedules and fuses; TopK, CumSum and ScatterElements lower to opaque sort and
scan kernels on TVM (and TopK's breaks its layout pre-packing), for no gain at n <= a few hundred.

Protected tokens (CLS) get +PROTECT, padding tokens -PAD (chosen first), so neither depends on
the score's scale: scores are probabilities or cosines, in [-1, 1].
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from effc.ir import new_initializer

PROTECT = 1e8
PAD = 1e4
_NAMES = itertools.count()  # node names unique however many emitters share a prefix


class Emitter:
    """Appends nodes to a graph, names them under ``prefix`` and remembers them (the pass's own nodes)."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix, self.nodes = graph, prefix, []

    def op(self, op_type: str, *inputs: ir.Value | None, outputs: int = 1, **attributes):
        name = f"{self.prefix}/{op_type}_{next(_NAMES)}"
        node = ir.node(op_type, list(inputs), attributes=attributes, num_outputs=outputs, name=name)
        self.graph.append(node)
        self.nodes.append(node)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}_{i}"
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def const(self, array, dtype=None) -> ir.Value:
        return new_initializer(self.graph, np.asarray(array, dtype=dtype), f"{self.prefix}/c")

    def ints(self, *values: int) -> ir.Value:
        return self.const(list(values), np.int64)


def _head_mean(e: Emitter, x: ir.Value, b: int, heads: int, rest: int) -> ir.Value:
    """[b, heads, ...] -> [b, 1, rest]: the mean over heads as a MatMul with a constant row (effc's
    CPU rules take a MatMul; a ReduceMean over a middle axis lands on the scalar fallback)."""
    flat = e.op("Reshape", x, e.ints(b, heads, rest))
    return e.op("MatMul", e.const(np.full((1, 1, heads), 1.0 / heads, np.float32)), flat)


def head_mean_probs(e: Emitter, probs: ir.Value, b: int, heads: int, n: int) -> ir.Value:
    """[b, h, n, n] -> [b, n, n]: attention probabilities averaged over heads."""
    return e.op("Reshape", _head_mean(e, probs, b, heads, n * n), e.ints(b, n, n))


def attention_received(e: Emitter, probs: ir.Value, b: int, heads: int, n: int) -> ir.Value:
    """[b, n]: the attention each token receives, averaged over heads and queries."""
    return e.op("Reshape", _head_mean(e, probs, b, heads * n, n), e.ints(b, n))


def pagerank(e: Emitter, probs: ir.Value, b: int, heads: int, n: int, iterations: int) -> ir.Value:
    """[b, n]: s <- A^T s from uniform, A the head-averaged probabilities (row = query)."""
    a = head_mean_probs(e, probs, b, heads, n)
    s = e.const(np.full((b, 1, n), 1.0 / n), np.float32)
    for _ in range(iterations):
        s = e.op("MatMul", s, a)
    return e.op("Reshape", s, e.ints(b, n))


def unit_keys(e: Emitter, keys_t: ir.Value, b: int, heads: int, dim: int, n: int) -> ir.Value:
    """[b, h, d, n] keys (QK^T's right operand) -> [b, n, d], averaged over heads, unit length."""
    mean = e.op("Reshape", _head_mean(e, keys_t, b, heads, dim * n), e.ints(b, dim, n))
    k = e.op("Transpose", mean, perm=[0, 2, 1])
    norm = e.op("ReduceL2", k, e.ints(-1), keepdims=1)
    return e.op("Div", k, e.op("Add", norm, e.const(1e-6, np.float32)))


def guard(e: Emitter, scores: ir.Value, n: int, protect: int, pad: ir.Value | None) -> ir.Value:
    """Scores with the first ``protect`` tokens lifted above all and padding (``pad``: -PAD) below all."""
    lift = np.zeros((1, n), np.float32)
    lift[0, :protect] = PROTECT
    scores = e.op("Add", scores, e.const(lift))
    return scores if pad is None else e.op("Add", scores, pad)


def redundancy_drop(e: Emitter, importance: ir.Value, unit: ir.Value, b: int, n: int, m: int) -> ir.Value:
    """Zero-TPrune's S-stage: the ``2 (n - m)`` least important tokens are candidates; the candidates
    most similar to an important token (redundant) go first. Returns keep scores [b, n]."""
    candidates = min(2 * (n - m), n - 1)
    is_important = e.op("Greater", keep_mask(e, importance, n, n - candidates), e.const(0.5, np.float32))
    sim = e.op("MatMul", unit, e.op("Transpose", unit, perm=[0, 2, 1]))  # [b, n, n]
    not_important = e.op("Cast", e.op("Not", is_important), to=ir.DataType.FLOAT)
    column_off = e.op("Unsqueeze", e.op("Mul", not_important, e.const(-4.0, np.float32)), e.ints(1))
    redundancy = e.op("ReduceMax", e.op("Add", sim, column_off), e.ints(2), keepdims=0)  # best important match
    # important tokens rank by importance above every candidate; candidates by -redundancy (in [-1, 1])
    lifted = e.op("Add", importance, e.const(PROTECT / 10, np.float32))
    return e.op("Where", is_important, lifted, e.op("Neg", redundancy))


def keep_mask(e: Emitter, scores: ir.Value, n: int, k: int) -> ir.Value:
    """[b, n] float, 1 for the ``k`` highest scores (ties: the earlier token), else 0."""
    above = e.op("Greater", e.op("Unsqueeze", scores, e.ints(1)), e.op("Unsqueeze", scores, e.ints(2)))  # s_j > s_i
    same = e.op("Equal", e.op("Unsqueeze", scores, e.ints(1)), e.op("Unsqueeze", scores, e.ints(2)))
    earlier = e.const(np.tril(np.ones((n, n), bool), -1)[None])  # [1, i, j]: j < i
    beaten = e.op("Cast", e.op("Or", above, e.op("And", same, earlier)), to=ir.DataType.FLOAT)
    rank = e.op("ReduceSum", beaten, e.ints(2), keepdims=0)
    return e.op("Cast", e.op("Less", rank, e.const(float(k), np.float32)), to=ir.DataType.FLOAT)


def output_rows(e: Emitter, keep: ir.Value, n: int) -> ir.Value:
    """[b, n] float: for a kept token, its row among the kept ones (a running count, minus one)."""
    upper = e.const(np.triu(np.ones((n, n), np.float32)))  # [t', t]: t' <= t
    count = e.op("MatMul", e.op("Unsqueeze", keep, e.ints(1)), upper)  # [b, 1, n]
    return e.op("Sub", e.op("Squeeze", count, e.ints(1)), e.const(1.0, np.float32))


def selection(e: Emitter, rows: ir.Value, keep: ir.Value | None, b: int, n: int, m: int) -> ir.Value:
    """[b, m, n] float: 1 where token t goes to output row j (and is kept, if ``keep``)."""
    wanted = e.const(np.arange(m, dtype=np.float32).reshape(1, m, 1))
    sel = e.op("Cast", e.op("Equal", e.op("Unsqueeze", rows, e.ints(1)), wanted), to=ir.DataType.FLOAT)
    return sel if keep is None else e.op("Mul", sel, e.op("Unsqueeze", keep, e.ints(1)))


def kept_indices(e: Emitter, sel: ir.Value, b: int, n: int, m: int) -> ir.Value:
    """[b, m] int64: the token each output row takes (``sel`` one-hot rows of kept tokens)."""
    where = e.op("MatMul", sel, e.const(np.arange(n, dtype=np.float32).reshape(n, 1)))  # [b, m, 1]
    return e.op("Cast", e.op("Reshape", where, e.ints(b, m)), to=ir.DataType.INT64)


def keep_top(e: Emitter, scores: ir.Value, b: int, n: int, m: int) -> ir.Value:
    """Indices [b, m] of the ``m`` highest scores, in ascending token order."""
    keep = keep_mask(e, scores, n, m)
    return kept_indices(e, selection(e, output_rows(e, keep, n), keep, b, n, m), b, n, m)


def gather_tokens(e: Emitter, x: ir.Value, index: ir.Value, b: int, m: int, hidden: int) -> ir.Value:
    """x [b, n, hidden] -> [b, m, hidden] at ``index`` [b, m]."""
    wide = e.op("Expand", e.op("Unsqueeze", index, e.ints(2)), e.ints(b, m, hidden))
    return e.op("GatherElements", x, wide, axis=1)


def bipartite_merge(e: Emitter, unit: ir.Value, b: int, n: int, m: int, protect: int,
                    pad: ir.Value | None) -> tuple[ir.Value, ir.Value]:
    """ToMe's bipartite soft matching: even tokens (a) merge into their most similar odd token (b);
    the ``n - m`` best-matched a-tokens go. Returns (merge matrix M [b, m, n] of 0/1, kept token
    indices [b, m] ascending). Protected tokens neither merge away nor receive. With a mask, padding
    tokens (a or b: they weigh nothing) go first, into token 0, and real tokens never merge into padding."""
    r = n - m
    a_pos, b_pos = np.arange(0, n, 2), np.arange(1, n, 2)
    ka = e.op("Gather", unit, e.const(a_pos, np.int64), axis=1)
    kb = e.op("Gather", unit, e.const(b_pos, np.int64), axis=1)
    sim = e.op("MatMul", ka, e.op("Transpose", kb, perm=[0, 2, 1]))  # [b, na, nb]
    off = np.zeros((1, len(a_pos), len(b_pos)), np.float32)
    off[:, a_pos < protect, :] = -PROTECT
    off[:, :, b_pos < protect] = -PROTECT
    sim = e.op("Add", sim, e.const(off))
    if pad is not None:
        pad_b = e.op("Unsqueeze", e.op("Gather", pad, e.const(b_pos, np.int64), axis=1), e.ints(1))
        sim = e.op("Add", sim, pad_b)
    best = e.op("ReduceMax", sim, e.ints(2), keepdims=0)  # [b, na]
    match = e.op("Cast", e.op("ArgMax", sim, axis=2, keepdims=0), to=ir.DataType.FLOAT)
    # over all n tokens (a placement MatMul): how much each wants to go (b-tokens never), and where to
    place = np.zeros((len(a_pos), n), np.float32)
    place[np.arange(len(a_pos)), a_pos] = 1.0
    place_a = e.const(place)
    b_never = np.zeros((1, n), np.float32)
    b_never[0, b_pos] = -PROTECT
    leave = e.op("Add", _placed(e, best, place_a), e.const(b_never))
    target = _placed(e, e.op("Add", e.op("Mul", match, e.const(2.0, np.float32)), e.const(1.0, np.float32)), place_a)
    if pad is not None:
        padding = e.op("Less", pad, e.const(-1.0, np.float32))
        leave = e.op("Where", padding, e.const(PAD, np.float32), leave)
        target = e.op("Where", padding, e.const(0.0, np.float32), target)
    keep = e.op("Sub", e.const(1.0, np.float32), keep_mask(e, leave, n, r))
    rows = output_rows(e, keep, n)
    destination = e.op("Where", e.op("Greater", keep, e.const(0.5, np.float32)),
                       e.const(np.arange(n, dtype=np.float32)[None]), target)
    rows_of = e.op("GatherElements", rows, e.op("Cast", destination, to=ir.DataType.INT64), axis=1)
    merge = selection(e, rows_of, None, b, n, m)
    kept = kept_indices(e, selection(e, rows, keep, b, n, m), b, n, m)
    return merge, kept


def _placed(e: Emitter, per_a: ir.Value, place: ir.Value) -> ir.Value:
    """[b, na] values of the a-tokens -> [b, n], zero at the b-tokens."""
    return e.op("Squeeze", e.op("MatMul", e.op("Unsqueeze", per_a, e.ints(1)), place), e.ints(1))
