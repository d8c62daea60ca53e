"""Find the transformer blocks of a ViT- or BERT-style encoder graph, for token pruning and merging.

A block is found from its attention probabilities: a Softmax over the last axis of a rank-4
[batch, heads, tokens, tokens] value that is the left operand of the MatMul with the values.
Walking back from the Softmax through the score arithmetic (scale Mul/Div, bias Add, Where)
reaches the QK^T MatMul; its right operand holds the keys [batch, heads, head_dim, tokens].
The operands met on the way that are not the scores are the block's side inputs: an additive
attention mask, which may depend on a graph input (an encoder's padding mask), or a constant.
A constant (or a constant part of a data-dependent mask) that differs from query row to query
row is a causal or position-dependent mask: such a model is refused, since pruning a decoder
is not training-free and a positional bias does not follow pruned tokens.

The block's residual stream entry is found from the keys: walk up from the keys to the key
projection (a MatMul/Gemm with a constant weight), then to its [batch, tokens, hidden] input.
If that input is a LayerNormalization whose own input is read elsewhere too (the residual Add),
the block is pre-LN and the stream is the norm's input; otherwise (post-LN, as BERT) the stream
is the projection's input itself, i.e. the previous block's last LayerNorm. Both work for
pruning between blocks: everything a block computes comes from its stream entry and side inputs.

The fused ONNX ``Attention`` op (opset 23, exported from sdpa) hides its probabilities: refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.ir import const_value

# Ops between the key projection and the QK^T MatMul that carry the keys unchanged in meaning.
_KEY_PLUMBING = ("Transpose", "Reshape", "Gather", "Split", "Slice", "Squeeze", "Unsqueeze", "Identity",
                 "Add", "Mul", "Div", "Cast", "Flatten")
_SCORE_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Cast")
# per-token norms (layernorm-to-rmsnorm leaves RMSNormalization): a pre-LN block reads the stream through one
_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")


class NotAnEncoder(Exception):
    """The graph's blocks cannot be established for token pruning; the message says why (one line)."""


@dataclass
class Block:
    index: int
    softmax: ir.Node        # its output: attention probabilities [B, H, N, N]
    qk: ir.Node             # the QK^T MatMul
    stream: ir.Value        # the block's input from the residual stream [B, N, D]
    side: list[ir.Value] = field(default_factory=list)  # score operands that are not the scores

    @property
    def probs(self) -> ir.Value:
        return self.softmax.outputs[0]

    @property
    def keys(self) -> ir.Value:
        """[B, H, head_dim, N]: the right operand of QK^T."""
        return self.qk.inputs[1]


@dataclass
class Encoder:
    blocks: list[Block]
    batch: int
    tokens: int
    hidden: int
    mask_bias: ir.Value | None  # a data-dependent additive score bias [B, 1, 1|N, N] (padding mask)
    norm: str                   # "pre-LN" or "post-LN"


def find_encoder(graph: ir.Graph) -> Encoder:
    """The blocks of ``graph`` in order, or NotAnEncoder with the reason."""
    fused = [n for n in graph if n.op_type in ("Attention", "MultiHeadAttention")]
    if fused:
        raise NotAnEncoder(f"attention is the fused {fused[0].op_type} op '{fused[0].name}', which hides its "
                           "probabilities (export with eager attention, or sdpa at opset <= 22 where it is "
                           "decomposed)")
    order = {id(n): i for i, n in enumerate(graph)}
    blocks = []
    for node in graph:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            block = _attention_block(node, len(blocks))
            if block is not None:
                blocks.append(block)
    if not blocks:
        raise NotAnEncoder("no recognisable attention (a Softmax over [batch, heads, tokens, tokens] feeding "
                           "the values' MatMul)")
    shape = blocks[0].probs.shape
    batch, tokens = shape[0], shape[-1]
    if not all(isinstance(d, int) for d in (batch, tokens)):
        raise NotAnEncoder(f"the attention shape {shape} is not static (token pruning keeps shapes static)")
    for block in blocks:
        keys = block.keys.shape
        if keys is None or len(keys) != 4 or not all(isinstance(d, int) for d in keys):
            raise NotAnEncoder(f"block {block.index}'s keys have no static [batch, heads, head_dim, tokens] shape "
                               f"({keys})")
        _check_causal(block)
        if list(block.probs.shape) [-1] != tokens:
            raise NotAnEncoder(f"blocks attend over different token counts ({tokens} and {block.probs.shape[-1]})")
        _stream_entry(block)
    streams = [b.stream for b in blocks]
    for before, after in zip(blocks, blocks[1:]):
        producer = after.stream.producer()
        if producer is None or order[id(producer)] < order[id(before.softmax)]:
            raise NotAnEncoder(f"the input of block {after.index} is not computed after block {before.index}'s "
                               "attention (blocks are not sequential)")
    hidden = streams[0].shape[-1]
    biases = [v for v in blocks[0].side if const_value(v) is None and _reads_input(v)]
    norm = "pre-LN" if _is_pre_ln(blocks[0]) else "post-LN"
    return Encoder(blocks, int(batch), int(tokens), int(hidden) if isinstance(hidden, int) else -1,
                   biases[0] if biases else None, norm)


def _attention_block(softmax: ir.Node, index: int) -> Block | None:
    probs = softmax.outputs[0]
    if probs.shape is None or len(probs.shape) != 4 or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    if not any(n.op_type == "MatMul" and i == 0 for n, i in probs.uses()):
        return None
    value, side = softmax.inputs[0], []
    for _ in range(8):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "MatMul" and all(const_value(v) is None for v in node.inputs):
            return Block(index, softmax, node, probs, side)  # stream found later
        if node.op_type not in _SCORE_OPS:
            return None
        scores = [v for v in node.inputs if v is not None and _leads_to_qk(v)]
        if len(scores) != 1:
            return None
        side += [v for v in node.inputs if v is not None and v is not scores[0]]
        value = scores[0]
    return None


def _leads_to_qk(value: ir.Value, depth: int = 8) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "MatMul":
        return all(const_value(v) is None for v in node.inputs) and value.shape is not None and len(value.shape) == 4
    return node.op_type in _SCORE_OPS and any(v is not None and _leads_to_qk(v, depth - 1) for v in node.inputs)


def _reads_input(value: ir.Value) -> bool:
    """Whether ``value`` depends on a graph input."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            return True
        node = v.producer()
        if node is not None:
            stack += [i for i in node.inputs if i is not None]
    return False


def _check_causal(block: Block) -> None:
    """Refuse a score bias that differs between query rows (causal or positional)."""
    tokens = block.probs.shape[-1]
    for side in block.side:
        for const in _constants_in_cone(side):
            if const.dtype.kind in "iu":  # indices and shapes, not mask values
                continue
            if const.ndim >= 2 and const.shape[-2] == tokens and tokens > 1:
                rows = np.asarray(const).reshape(-1, tokens, const.shape[-1])
                if not np.all(rows == rows[:, :1]):
                    raise NotAnEncoder(f"block {block.index}'s attention scores get a mask that differs between "
                                       "query rows (causal or positional, a decoder): pruning it is not "
                                       "training-free")


def _constants_in_cone(value: ir.Value, limit: int = 64) -> list[np.ndarray]:
    out, stack, seen = [], [value], set()
    while stack and len(seen) < limit:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        array = const_value(v)
        if array is not None:
            out.append(array)
            continue
        node = v.producer()
        if node is not None:
            stack += [i for i in node.inputs if i is not None]
    return out


def _stream_entry(block: Block) -> None:
    """Set ``block.stream`` from the keys' projection (see the module docstring)."""
    value = block.keys
    for _ in range(16):
        node = value.producer()
        if node is None:
            raise NotAnEncoder(f"block {block.index}'s keys come from a graph input, not a projection")
        if node.op_type in ("MatMul", "Gemm") and const_value(node.inputs[1]) is not None:
            value = node.inputs[0]
            break
        if node.op_type not in _KEY_PLUMBING:
            raise NotAnEncoder(f"block {block.index}'s keys come through {node.op_type} '{node.name}', which the "
                               "analysis does not follow")
        data = [v for v in node.inputs if v is not None and const_value(v) is None]
        if len(data) != 1:
            raise NotAnEncoder(f"block {block.index}'s keys mix two computed values at {node.op_type} '{node.name}'")
        value = data[0]
    else:
        raise NotAnEncoder(f"block {block.index}: no key projection within 16 ops of the attention")
    tokens = block.probs.shape[-1]
    for _ in range(3):  # a Gemm reads [B*N, D]: step back to the [B, N, D] value
        if value.shape is not None and len(value.shape) == 3:
            break
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Flatten"):
            break
        value = node.inputs[0]
    if value.shape is None or len(value.shape) != 3 or value.shape[1] != tokens:
        raise NotAnEncoder(f"block {block.index}'s key projection reads '{value.name}' of shape {value.shape}, "
                           f"not [batch, {tokens}, hidden]")
    node = _norm_behind(value)
    if node is not None:
        source = node.inputs[0]
        if len({id(n) for n, _ in source.uses()}) > 1 and source.shape is not None and list(source.shape) == list(value.shape):
            value = source  # pre-LN: the norm's input is the stream, also read by the residual Add
    block.stream = value


def _norm_behind(value: ir.Value) -> ir.Node | None:
    """The per-token norm that writes ``value``, possibly through its affine as separate Mul / Add
    with constants (layernorm-to-rmsnorm leaves RMSNormalization + Add(beta))."""
    for _ in range(3):
        node = value.producer()
        if node is None:
            return None
        if node.op_type in _NORMS:
            return node
        data = [v for v in node.inputs if v is not None and const_value(v) is None]
        if node.op_type not in ("Add", "Mul") or len(data) != 1 or len(value.uses()) > 1:
            return None
        value = data[0]
    return None


def _is_pre_ln(block: Block) -> bool:
    node = block.stream.producer()
    return node is None or node.op_type not in _NORMS
