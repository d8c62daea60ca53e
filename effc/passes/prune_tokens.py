"""prune-tokens: training-free token pruning (Zero-TPrune, attention top-k) and merging (ToMe) on the graph.

Between two blocks of a ViT/BERT-style encoder (found by :mod:`effc.passes._token_blocks`) the
residual stream [B, N, D] is reduced to [B, N', D] with standard ONNX ops chosen from the block
just finished (:mod:`effc.passes._token_ops`):

- ``zero-tprune``: importance by weighted PageRank over the head-averaged attention probabilities
  (s <- A^T s from uniform, ``iterations`` times), then the least important tokens that are most
  similar to an important one (head-averaged keys, cosine) are dropped;
- ``tome``: bipartite soft matching on the head-averaged keys; matched tokens are averaged by
  size through a 0/1 merge matrix (MatMul) and later blocks add log(size) to their attention
  scores (proportional attention);
- ``topk``: the tokens that receive the least attention are dropped.

The first ``protect`` tokens (CLS) are always kept; padding tokens (an encoder's attention mask)
go first; kept tokens stay in order. Token counts come from the keep schedule
(:mod:`effc.passes._token_schedule`) and are static, so every later op sees its reduced shape.
What else the blocks read with a token axis (the attention mask, a pooling mask) is gathered
alongside with the kept tokens' original positions; reshape targets get the new counts.

Placement: between blocks for every method (ToMe's paper merges between attention and MLP inside
a block; here the merge follows the block, using that block's keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from effc.ir import const_value, opset, replace_input
from effc.passes import _token_ops as T
from effc.passes._token_blocks import Encoder, NotAnEncoder, find_encoder
from effc.passes._token_schedule import block_flops, from_list, from_target
from effc.passes.base import Pass, PassContext, PassOutcome
from effc.passes.options import option

METHODS = ("zero-tprune", "tome", "topk")
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "And", "Or", "Equal", "Less", "Greater", "Max", "Min"})


@dataclass
class Options:
    method: str = option("zero-tprune", "how tokens are chosen", choices=METHODS)
    keep: float = option(0.65, "fraction of the blocks' FLOPs to keep (0.65: 35% fewer)", low=0.05, high=1.0)
    schedule: str | None = option(None, "per-block token counts instead of keep: fractions of the full count "
                                  "(\"1,0.8,0.6,0.5\") or counts (\"65,52,39,26\"), one per block")
    protect: int = option(1, "leading tokens always kept (CLS; 2 with a distillation token)", low=1)
    iterations: int = option(3, "PageRank iterations (zero-tprune)", low=1, high=50)


@dataclass
class _State:
    """What the tokens are after a stage: count, original positions [B, n], real-token mask, sizes."""

    n: int
    positions: ir.Value
    real: ir.Value | None
    size: ir.Value | None
    stream: ir.Value | None = None  # the reduced stream [B, n, D] (None before any reduction)


class PruneTokens(Pass):
    name = "prune-tokens"
    summary = "training-free token pruning / merging between encoder blocks (Zero-TPrune, ToMe, top-k)"
    exact = False
    Options = Options

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        opts = self.read_options(ctx.options)
        outcome = PassOutcome()
        if opset(model) < 18:
            outcome.skip("model", f"opset {opset(model)} < 18 (the pass emits reductions with axes as inputs)")
            return outcome
        try:
            enc = find_encoder(model.graph)
            counts = self._counts(enc, opts, model.graph)
            plan = _plan_side_inputs(model.graph, enc, counts)
        except NotAnEncoder as exc:
            outcome.skip("model", str(exc))
            return outcome
        if counts[-1] == counts[0]:
            outcome.skip("model", f"the keep schedule {counts} removes no token")
            return outcome
        _rewrite(model, enc, counts, opts, plan, outcome)
        return outcome

    @staticmethod
    def _counts(enc: Encoder, opts: Options, graph: ir.Graph) -> list[int]:
        halve = opts.method == "tome"
        if opts.protect >= enc.tokens - 1:
            raise NotAnEncoder(f"protect={opts.protect} leaves nothing to prune of {enc.tokens} tokens")
        if opts.schedule:
            return from_list(opts.schedule, enc.tokens, len(enc.blocks), opts.protect, halve)
        per_token = _per_token_flops(graph, enc)
        return from_target(enc.tokens, len(enc.blocks), opts.keep, per_token, enc.hidden, opts.protect, halve)


def _per_token_flops(graph: ir.Graph, enc: Encoder) -> float:
    """2 x the constant weights of the linears that read every token, per block."""
    total = 0
    for node in graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            weight, data = const_value(node.inputs[1]), node.inputs[0]
            shape = data.shape
            if weight is None or weight.ndim != 2 or shape is None:
                continue
            if (len(shape) == 3 and shape[1] == enc.tokens) or (len(shape) == 2 and shape[0] == enc.batch * enc.tokens):
                total += weight.size
    return 2.0 * total / len(enc.blocks)


# --- what else carries the token axis ---------------------------------------------------------

@dataclass
class _SidePlan:
    stage_of: dict[int, int]  # id(node) -> the last reducing stage whose stream reaches it
    shapes: list[tuple[ir.Node, int, np.ndarray]]  # (node, input, shape constant) to re-count
    gathers: list[tuple[ir.Node, int, list[int]]]  # (node, input, token axes) to gather


def _plan_side_inputs(graph: ir.Graph, enc: Encoder, counts: list[int]) -> _SidePlan:
    """Which inputs of the nodes after each reduction carry the full token axis from elsewhere."""
    stage_of: dict[int, int] = {}
    for l in range(1, len(enc.blocks)):
        if counts[l] == counts[l - 1]:
            continue
        for node in _reachable(enc.blocks[l].stream):
            stage_of[id(node)] = l
    big, b = enc.tokens, enc.batch
    shapes, gathers = [], []
    for node in graph:
        stage = stage_of.get(id(node))
        if stage is None:
            continue
        for i, value in enumerate(node.inputs):
            if value is None or _reached(value, stage, stage_of, enc):
                continue
            producer = value.producer()
            if producer is not None and stage_of.get(id(producer)) not in (None, stage):
                raise NotAnEncoder(f"{node.op_type} '{node.name}' after block {stage - 1} reads '{value.name}', "
                                   "computed before an earlier reduction (a skip across blocks)")
            array = const_value(value)
            if node.op_type in ("Reshape", "Expand") and i == 1:
                if array is None:
                    raise NotAnEncoder(f"{node.op_type} '{node.name}' after block {stage - 1} takes a computed shape")
                hits = [j for j, d in enumerate(array.reshape(-1)) if d in (big, b * big)]
                if len(hits) > 1:
                    raise NotAnEncoder(f"{node.op_type} '{node.name}' target {array.tolist()} names the token count "
                                       "twice (ambiguous)")
                if hits:
                    shapes.append((node, i, array))
                continue
            axes = _token_axes(node, value, big)
            if axes is None or (array is not None and (array.ndim < 2 or node.op_type not in _ELEMENTWISE)):
                continue
            if node.op_type not in _ELEMENTWISE:
                raise NotAnEncoder(f"{node.op_type} '{node.name}' after block {stage - 1} reads '{value.name}' with a "
                                   "token axis that the analysis cannot follow")
            gathers.append((node, i, axes))
    return _SidePlan(stage_of, shapes, gathers)


def _reachable(value: ir.Value) -> list[ir.Node]:
    seen: dict[int, ir.Node] = {}
    stack = [value]
    while stack:
        for node, _ in stack.pop().uses():
            if id(node) not in seen:
                seen[id(node)] = node
                stack += list(node.outputs)
    return list(seen.values())


def _reached(value: ir.Value, stage: int, stage_of: dict[int, int], enc: Encoder) -> bool:
    if value is enc.blocks[stage].stream:
        return True
    producer = value.producer()
    return producer is not None and stage_of.get(id(producer)) == stage


def _token_axes(node: ir.Node, value: ir.Value, tokens: int) -> list[int] | None:
    """Axes of ``value`` that are the token axis of ``node``'s output (right-aligned broadcasting)."""
    out, shape = node.outputs[0].shape, value.shape
    if out is None or shape is None:
        return None
    offset = len(out) - len(shape)
    axes = [k for k, d in enumerate(shape) if d == tokens and k + offset >= 0 and out[k + offset] == tokens]
    return axes or None


# --- the rewrite ------------------------------------------------------------------------------

def _rewrite(model: ir.Model, enc: Encoder, counts: list[int], opts: Options, plan: _SidePlan,
             outcome: PassOutcome) -> None:
    graph = model.graph
    per_token = _per_token_flops(graph, enc)
    b, big = enc.batch, enc.tokens
    e = T.Emitter(graph, "prune_tokens")
    state = _State(big, e.const(np.tile(np.arange(big, dtype=np.int64), (b, 1))), None, None)
    if enc.mask_bias is not None:
        state.real = _real_tokens(e, enc.mask_bias, b, big)
    if opts.method == "tome":
        state.size = e.const(np.ones((b, big), np.float32))
    states = {0: state}
    for l in range(1, len(enc.blocks)):
        n, m = counts[l - 1], counts[l]
        if m < n:
            e = T.Emitter(graph, f"prune_tokens/block{l}")
            state = _reduce(e, enc, l, state, m, opts)
            e_nodes = {id(x) for x in e.nodes}
            stream = enc.blocks[l].stream
            for node, i in list(stream.uses()):
                if id(node) not in e_nodes and not node.name.startswith("prune_tokens"):
                    node.replace_input_with(i, state.stream)
            outcome.rewrite(f"block {l}", "merge" if opts.method == "tome" else "prune", method=opts.method,
                            tokens_before=n, tokens_after=m)
            states[l] = state
        if state.size is not None and state.n < big:
            _proportional_attention(graph, enc, l, state)
    _apply_side_plan(graph, enc, counts, plan, states)
    full = len(counts) * block_flops(big, per_token, enc.hidden)
    outcome.rewrite("model", "schedule", method=opts.method, tokens=counts,
                    block_flops_kept=round(sum(block_flops(n, per_token, enc.hidden) for n in counts) / full, 4))
    # shapes after a reduction are stale: infer them again from the new counts
    for node in graph:
        if id(node) in plan.stage_of:
            for out in node.outputs:
                out.shape = None
    graph.sort()
    ShapeInferencePass()(model)


def _real_tokens(e: T.Emitter, bias: ir.Value, b: int, n: int) -> ir.Value:
    """[b, n] float: 1 for a real token, 0 for padding, from the additive mask bias [B|1, 1, 1|n, n]."""
    row = e.op("ReduceMax", bias, e.ints(1, 2), keepdims=0)
    if bias.shape[0] != b:
        row = e.op("Expand", row, e.ints(b, n))
    return e.op("Cast", e.op("Greater", row, e.const(-1e3, np.float32)), to=ir.DataType.FLOAT)


def _reduce(e: T.Emitter, enc: Encoder, l: int, state: _State, m: int, opts: Options) -> _State:
    b, n, hidden = enc.batch, state.n, enc.hidden
    before = enc.blocks[l - 1]
    heads, dim = before.probs.shape[1], before.keys.shape[2]  # unchanged by earlier reductions
    x = enc.blocks[l].stream
    pad = None
    if state.real is not None:
        pad = e.op("Mul", e.op("Sub", state.real, e.const(1.0, np.float32)), e.const(T.PAD, np.float32))
    if opts.method == "tome":
        unit = T.unit_keys(e, before.keys, b, heads, dim, n)
        merge, kept = T.bipartite_merge(e, unit, b, n, m, opts.protect, pad)
        size = state.size if state.real is None else e.op("Mul", state.size, state.real)
        weight = e.op("Unsqueeze", size, e.ints(2))
        if state.real is not None:  # padding has weight 0: keep 0/0 away from a kept padding token
            weight = e.op("Max", weight, e.const(1e-12, np.float32))
        total = e.op("MatMul", merge, weight)
        stream = e.op("Div", e.op("MatMul", merge, e.op("Mul", x, weight)), total)
        new_size = e.op("Reshape", e.op("MatMul", merge, e.op("Unsqueeze", size, e.ints(2))), e.ints(b, m))
    else:
        if opts.method == "topk":
            scores = T.guard(e, T.attention_received(e, before.probs, b, heads, n), n, opts.protect, pad)
        else:
            importance = T.guard(e, T.pagerank(e, before.probs, b, heads, n, opts.iterations), n, opts.protect, pad)
            scores = T.redundancy_drop(e, importance, T.unit_keys(e, before.keys, b, heads, dim, n), b, n, m)
            scores = scores if pad is None else e.op("Add", scores, pad)
        kept = T.keep_top(e, scores, b, n, m)
        stream = T.gather_tokens(e, x, kept, b, m, hidden)
        new_size = None
    positions = e.op("GatherElements", state.positions, kept, axis=1)
    positions.name = f"prune_tokens/block{l}/positions"  # the kept tokens' original positions [B, m]
    real = None if state.real is None else e.op("GatherElements", state.real, kept, axis=1)
    if new_size is not None and real is not None:  # a kept padding token counts 1 (its log is 0)
        new_size = e.op("Add", new_size, e.op("Sub", e.const(1.0, np.float32), real))
    return _State(m, positions, real, new_size, stream)


def _proportional_attention(graph: ir.Graph, enc: Encoder, l: int, state: _State) -> None:
    """ToMe: block ``l``'s scores + log(size) of each key, so a merged token keeps its weight."""
    e = T.Emitter(graph, f"prune_tokens/block{l}_size")
    log_size = e.op("Unsqueeze", e.op("Log", state.size), e.ints(1, 2))  # [b, 1, 1, n]
    softmax = enc.blocks[l].softmax
    softmax.replace_input_with(0, e.op("Add", softmax.inputs[0], log_size))


def _apply_side_plan(graph: ir.Graph, enc: Encoder, counts: list[int], plan: _SidePlan,
                     states: dict[int, _State]) -> None:
    big, b = enc.tokens, enc.batch
    for node, i, array in plan.shapes:
        n = counts[plan.stage_of[id(node)]]
        fixed = np.array([n if d == big else b * n if d == b * big else d for d in array.reshape(-1)], np.int64)
        replace_input(node, i, fixed, f"prune_tokens/shape{n}")
    cache: dict[tuple, ir.Value] = {}
    for node, i, axes in plan.gathers:
        stage = plan.stage_of[id(node)]
        value = node.inputs[i]
        key = (id(value), stage, tuple(axes))
        if key not in cache:
            e = T.Emitter(graph, f"prune_tokens/side{stage}")
            cache[key] = _gather_axes(e, value, axes, states[stage].positions, b, states[stage].n)
        node.replace_input_with(i, cache[key])


def _gather_axes(e: T.Emitter, value: ir.Value, axes: list[int], positions: ir.Value, b: int, n: int) -> ir.Value:
    """``value`` at the kept tokens' original positions along each of ``axes``."""
    shape = list(value.shape)
    if 0 in axes:
        raise NotAnEncoder(f"'{value.name}' has its token axis first")
    if shape[0] != b:
        shape[0] = b
        value = e.op("Expand", value, e.ints(*shape))
    for axis in axes:
        shape[axis] = n
        index = e.op("Reshape", positions, e.ints(*[b if k == 0 else n if k == axis else 1 for k in range(len(shape))]))
        value = e.op("GatherElements", value, e.op("Expand", index, e.ints(*shape)), axis=axis)
    return value

