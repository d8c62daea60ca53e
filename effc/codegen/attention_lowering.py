"""Lower the standard ONNX Attention op (opset 23/24) to the Relax ops of its decomposed form.

TVM 0.27's importer converts every op named Attention as com.microsoft's contrib Attention (a
packed-QKV op with a ``num_heads`` attribute), so the op torch's exporter writes for
scaled_dot_product_attention failed with KeyError 'num_heads'. While importing, :data:`OVERRIDE`
(effc.codegen.custom_ops' importer hook) converts a standard Attention node to what an eager
export spells out: ``softmax(matmul(Q, K^T) * scale + bias) @ V``. The CPU matmul and softmax
rules then schedule it exactly as they schedule the eager form, and the scale multiply and the
bias add fuse into the first matmul's write-back.

Semantics (the op's reference, onnx/reference/ops/op_attention.py): 3-D inputs [B, S, H*D] with
q_num_heads/kv_num_heads or 4-D [B, H, S, D]; K/V heads repeated for GQA/MQA; past_key/past_value
concatenated before K/V (present_key/present_value outputs); a bool mask (True = attend) or a
float mask added, shorter masks padded to the key length; is_causal aligned bottom-right (offset =
past length, or nonpad_kv_seqlen - S_q per batch); nonpad_kv_seqlen masks padded keys; softcap;
softmax_precision; a query row whose bias is -inf everywhere gives a zero output row. The debug
output qk_matmul_output is served in mode 0 without softcap; anything else is refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.codegen.custom_ops import Override
from effc.errors import EffcError

OP = "Attention"
SINCE = 23  # the standard op; the importer's own "Attention" entry is the contrib one
FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def is_attention(node: ir.Node) -> bool:
    return node.op_type == OP and node.domain in ("", "ai.onnx")


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _outputs_used(node: ir.Node) -> list[bool]:
    return [v is not None and v.name != "" for v in node.outputs]


def check_attention(model: ir.Model) -> None:
    """Raise EffcError (one line, naming the node) for an Attention node effc cannot lower exactly."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(model.graph)):
        if not is_attention(node):
            continue
        name = f"Attention node '{node.name or i}'"
        reason = _misfit(node, opset)
        if reason:
            raise EffcError(f"{name}: {reason}")


def _misfit(node: ir.Node, opset: int) -> str | None:
    if opset < SINCE:
        return f"opset {opset} has no standard Attention (it exists from opset {SINCE})"
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    q, k, v, mask, past_k, past_v, nonpad = inputs[:7]
    if q is None or k is None or v is None:
        return "needs Q, K and V"
    for value in (q, k, v, past_k, past_v):
        if value is not None and value.dtype is not None and value.dtype not in FLOATS:
            return f"'{value.name}' is {value.dtype}: effc lowers float attention only"
    if (past_k is None) != (past_v is None):
        return "past_key and past_value must be given together"
    if nonpad is not None and past_k is not None:
        return "nonpad_kv_seqlen cannot be combined with past_key/past_value"
    for window in ("left_window_size", "right_window_size"):  # opset 25
        if _attr(node, window, -1) != -1:
            return f"{window} (sliding-window attention) is not supported by effc's lowering yet"
    used = _outputs_used(node) + [False] * 4
    if used[3]:
        mode = _attr(node, "qk_matmul_output_mode", 0)
        if mode != 0:
            return f"qk_matmul_output_mode {mode} is not supported (only mode 0, the scaled Q*K^T)"
        if _attr(node, "softcap", 0.0):
            return "qk_matmul_output with softcap is not supported (the spec and its reference disagree)"
    ranks = {len(x.shape) for x in (q, k, v) if x.shape is not None}
    if len(ranks) > 1:
        return f"Q, K and V have different ranks {sorted(ranks)}"
    if ranks and ranks != {3} and ranks != {4}:
        return f"Q, K and V must be 3-D or 4-D, got rank {ranks.pop()}"
    if ranks == {3} and (_attr(node, "q_num_heads") is None or _attr(node, "kv_num_heads") is None):
        return "3-D Q/K/V need the q_num_heads and kv_num_heads attributes"
    return _head_misfit(node, q, k, v)


def _head_misfit(node: ir.Node, q: ir.Value, k: ir.Value, v: ir.Value) -> str | None:
    """Head counts that do not divide, from the static shapes (the converter checks again)."""
    shapes = [list(x.shape or []) for x in (q, k, v)]
    if not all(shape and all(isinstance(d, int) for d in shape) for shape in shapes):
        return None
    if len(shapes[0]) == 3:
        heads_q, heads_kv = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
        for role, shape, heads in (("Q", shapes[0], heads_q), ("K", shapes[1], heads_kv), ("V", shapes[2], heads_kv)):
            if heads <= 0 or shape[2] % heads:
                return f"{role} has {shape[2]} features, not a multiple of {heads} heads"
    else:
        heads_q, heads_kv = shapes[0][1], shapes[1][1]
    if heads_kv <= 0 or heads_q % heads_kv:
        return f"{heads_q} query heads are not a multiple of {heads_kv} key/value heads"
    return None


def _dims(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def convert(bb, inputs, attr):
    """The Relax form of one Attention node (shapes static; see the module docstring)."""
    from tvm import relax

    op = relax.op
    inputs = list(inputs) + [None] * (7 - len(inputs))
    q, k, v, mask, past_k, past_v, nonpad = inputs[:7]
    node = attr["tvm_custom"]["name"] or OP
    dtype = str(q.ty.dtype)

    def c(value, dt=dtype):
        return relax.const(value, dt)

    def emit(expr):
        return bb.emit(expr)

    rank = len(q.ty.shape)
    if rank == 3:
        heads_q, heads_kv = int(attr["q_num_heads"]), int(attr["kv_num_heads"])
        q, k, v = (_split_heads(bb, x, h, node, role)
                   for x, h, role in ((q, heads_q, "Q"), (k, heads_kv, "K"), (v, heads_kv, "V")))
    batch, heads_q, len_q, depth = _dims(q)
    if past_k is not None:
        k = emit(op.concat([past_k, k], axis=2))
        v = emit(op.concat([past_v, v], axis=2))
    present_k, present_v = k, v
    _, heads_kv, len_kv, depth_k = _dims(k)
    if depth_k != depth or _dims(v)[:3] != [batch, heads_kv, len_kv] or _dims(k)[0] != batch:
        raise EffcError(f"Attention node '{node}': Q {_dims(q)}, K {_dims(k)} and V {_dims(v)} do not fit "
                        "together (after past_key/past_value)")
    if heads_q != heads_kv:
        if heads_q % heads_kv:
            raise EffcError(f"Attention node '{node}': {heads_q} query heads are not a multiple of "
                            f"{heads_kv} key/value heads")
        k = emit(op.repeat(k, heads_q // heads_kv, axis=1))  # query head h reads kv head h // group
        v = emit(op.repeat(v, heads_q // heads_kv, axis=1))
    scale = attr.get("scale")
    scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(depth))
    scores = emit(op.multiply(emit(op.matmul(q, emit(op.permute_dims(k, [0, 1, 3, 2])))), c(scale)))
    qk_output = scores
    softcap = float(attr.get("softcap", 0.0) or 0.0)
    if softcap > 0:
        scores = emit(op.multiply(emit(op.tanh(emit(op.multiply(scores, c(1.0 / softcap))))), c(softcap)))
    offset = _dims(past_k)[2] if past_k is not None else 0
    bias, visible, maybe_dead = _bias(bb, mask, nonpad, bool(attr.get("is_causal", 0)), len_q, len_kv, offset,
                                      dtype, node)
    if visible is not None:
        scores = emit(op.where(visible, scores, c(-np.inf)))
    keep = None
    if bias is not None and maybe_dead:
        # A row masked everywhere would softmax to NaN (-inf - -inf); the op wants zeros there. Found
        # by counting -inf entries, not by max(bias) == -inf: TVM's max starts from float32's lowest
        # finite value, so an all -inf row has max -3.4e38.
        attended = emit(op.where(emit(op.equal(bias, c(-np.inf))), c(0.0), c(1.0)))
        keep = emit(op.max(attended, axis=[-1], keepdims=True))  # 1: some key attended, 0: none
        bias = emit(op.where(emit(op.greater(keep, c(0.5))), bias, c(0.0)))
    if bias is not None:
        scores = emit(op.add(scores, bias))
    precision = attr.get("softmax_precision")
    if precision is not None:
        from onnx import helper

        wide = str(np.dtype(helper.tensor_dtype_to_np_dtype(int(precision))))
        probs = emit(op.astype(emit(op.nn.softmax(emit(op.astype(scores, wide)), axis=-1)), dtype))
    else:
        probs = emit(op.nn.softmax(scores, axis=-1))
    y = emit(op.matmul(probs, v))
    if keep is not None:
        y = emit(op.multiply(y, keep))
    if rank == 3:
        y = emit(op.reshape(emit(op.permute_dims(y, [0, 2, 1, 3])), [batch, len_q, heads_q * _dims(v)[3]]))
    count = attr["tvm_custom"]["num_outputs"]
    if count == 1:
        return y
    return relax.Tuple([y, present_k, present_v, qk_output][:count])


def _split_heads(bb, x, heads: int, node: str, role: str):
    """[B, S, H*D] -> [B, H, S, D]."""
    from tvm import relax

    batch, length, hidden = _dims(x)
    if hidden % heads:
        raise EffcError(f"Attention node '{node}': {role} has {hidden} features, not a multiple of {heads} heads")
    x = bb.emit(relax.op.reshape(x, [batch, length, heads, hidden // heads]))
    return bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))


def _bias(bb, mask, nonpad, causal: bool, len_q: int, len_kv: int, offset: int, dtype: str, node: str):
    """(additive bias broadcastable to [B, H, S_q, S_kv] or None, a constant bool [S_q, S_kv] of the keys
    each query sees when that is all there is to the bias (else None), whether a row of the bias may
    be all -inf)."""
    from tvm import relax

    op = relax.op

    def c(value, dt=dtype):
        return relax.const(value, dt)

    bias, visible, maybe_dead = None, None, False
    if mask is not None:
        mask_dims = _dims(mask)
        is_bool = str(mask.ty.dtype) == "bool"
        if mask_dims[-1] > len_kv:
            raise EffcError(f"Attention node '{node}': attn_mask covers {mask_dims[-1]} keys, K has {len_kv}")
        if mask_dims[-1] < len_kv:  # the op pads a short mask with "do not attend"
            fill = relax.const(np.full([*mask_dims[:-1], len_kv - mask_dims[-1]], False if is_bool else -np.inf,
                                       dtype="bool" if is_bool else dtype))
            mask = bb.emit(op.concat([mask, fill], axis=-1))
        bias = bb.emit(op.where(mask, c(0.0), c(-np.inf))) if is_bool else mask
        maybe_dead = True
    if causal and nonpad is None:
        # Bottom-right aligned: query i sees key j <= i + offset, so key 0 is always visible. Kept as a
        # bool constant that selects from a computed tensor (as GPT-2's eager causal mask does): a
        # float bias would be folded into an [S_q, S_kv] float32 constant, 4x the bytes.
        visible = relax.const(np.arange(len_kv)[None, :] <= np.arange(len_q)[:, None] + offset)
        if bias is not None:
            bias, visible = bb.emit(op.where(visible, bias, c(-np.inf))), None
    if nonpad is not None:
        # Per batch: keys at or past nonpad_kv_seqlen[b] are padding; causal offset nonpad[b] - S_q.
        batch = _dims(nonpad)[0]
        lengths = bb.emit(op.reshape(nonpad, [batch, 1, 1, 1]))
        keys = relax.const(np.arange(len_kv, dtype="int64").reshape(1, 1, 1, len_kv))
        allowed = bb.emit(op.less(keys, lengths))
        if causal:
            # j <= i + nonpad[b] - S_q  <=>  j - i + S_q <= nonpad[b]
            reach = np.arange(len_kv)[None, :] - np.arange(len_q)[:, None] + len_q
            within = bb.emit(op.less_equal(relax.const(reach.astype("int64").reshape(1, 1, len_q, len_kv)),
                                           lengths))
            allowed = bb.emit(op.logical_and(allowed, within))
        padding = bb.emit(op.where(allowed, c(0.0), c(-np.inf)))
        bias = padding if bias is None else bb.emit(op.add(bias, padding))
        maybe_dead = True
    return bias, visible, maybe_dead


OVERRIDE = Override(OP, SINCE, convert, check_attention)  # listed in custom_ops.OVERRIDES
