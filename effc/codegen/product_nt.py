"""Attention's Q.K^T with K read as rows: a @ b_t^T from b_t [.., N, K], not from a materialised K^T.

An exported attention writes K^T as a transpose of the K projection's rows ([.., tokens, 64] ->
[.., 64, tokens]): a kernel that moves every element to a strided place (vit-s16 bf16: 0.8 ms of
17). Where B is such a permute_dims, B^T is one permute that keeps the source's last axis last (a
move of whole rows, as cheap as V's heads), and the product reads it along k. Used by the int8 QDQ
lowering (effc.codegen.qdq_lowering) and the bf16 matmuls (effc.codegen.bf16_matmul)."""

from __future__ import annotations


def rows_transposed(bb, b):
    """B^T as one permute_dims of B's source that keeps the source's last axis last, when B is a
    permute_dims (its binding or the expression itself) putting that axis at -2; else None."""
    from tvm import ir, relax

    expr = b
    if isinstance(expr, relax.Var):
        expr = bb.lookup_binding(expr)
    if not isinstance(expr, relax.Call) or expr.op != ir.Op.get("relax.permute_dims"):
        return None
    source = expr.args[0]
    rank = len(bb.normalize(source).ty.shape)
    axes = [int(x) for x in expr.attrs.axes] if expr.attrs.axes is not None else list(range(rank))[::-1]
    composed = axes[:-2] + [axes[-1], axes[-2]]
    if rank < 2 or composed[-1] != rank - 1:
        return None
    return relax.op.permute_dims(source, composed)


def product_nt(bb, a, b_t, acc: str):
    """``acc`` a @ b_t^T: a [.., M, K], b_t [.., N, K] with the same leading dims (attention's batch
    and heads), each element cast to ``acc`` (int32 for u8 x s8, float32 for bf16); else relax's
    broadcasting matmul of a and b_t^T."""
    from tvm import relax, te

    a_shape = [int(d) for d in bb.normalize(a).ty.shape]
    b_shape = [int(d) for d in bb.normalize(b_t).ty.shape]
    if a_shape[:-2] != b_shape[:-2] or a_shape[-1] != b_shape[-1]:
        rank = len(b_shape)
        return relax.op.matmul(a, relax.op.permute_dims(b_t, list(range(rank - 2)) + [rank - 1, rank - 2]),
                               out_dtype=acc)

    def compute(x, y):
        k = te.reduce_axis((0, a_shape[-1]), name="k")
        return te.compute(a_shape[:-1] + [b_shape[-2]],
                          lambda *i: te.sum(x[(*i[:-1], k)].astype(acc) * y[(*i[:-2], i[-1], k)].astype(acc),
                                            axis=k), name="matmul")

    return bb.emit_te(compute, bb.emit(a), bb.emit(b_t), primfunc_name_hint="matmul")
