"""Patch-embedding convolutions as matmuls (a Relax rewrite, run before weights are folded).

A ViT's patch embedding is a Conv whose stride equals its kernel and has no padding: every output
pixel is one non-overlapping patch dotted with each filter. As a conv it falls to the fallback rule
(a third of vit-s16's time); as `patches @ W^T` it is a dense matmul that the matmul rule tiles and
whose weight the build pre-packs. The patch gather is a reshape/transpose (one cheap pass), and
the weight's reshape/transpose is weight-only, so it is evaluated at compile time.
"""

from __future__ import annotations

from effc.codegen.relax_rewrite import mutator_pass


def patchify_conv():
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class Patchify(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            shapes = _patch_conv_shapes(call)
            if shapes is None:
                return call
            (n, c, h, w), (o, p, q) = shapes
            hp, wp = h // p, w // q
            op, emit = relax.op, self.builder_.emit
            x = emit(op.reshape(call.args[0], (n, c, hp, p, wp, q)))
            x = emit(op.permute_dims(x, [0, 2, 4, 1, 3, 5]))
            x = emit(op.reshape(x, (n, hp * wp, c * p * q)))
            weight = emit(op.permute_dims(emit(op.reshape(call.args[1], (o, c * p * q))), [1, 0]))
            y = emit(op.matmul(x, weight))
            y = emit(op.permute_dims(y, [0, 2, 1]))
            return op.reshape(y, (n, o, hp, wp))

    return mutator_pass(Patchify, "EffcPatchify")


def _patch_conv_shapes(call):
    """((n, c, h, w), (o, p, q)) when ``call`` is an NCHW/OIHW conv2d with stride == kernel, no
    padding or dilation, one group and shapes that tile exactly; else None."""
    if getattr(call.op, "name", None) != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW") or int(a.groups) != 1:
        return None
    if any(int(v) != 0 for v in a.padding) or any(int(v) != 1 for v in a.dilation):
        return None
    try:
        n, c, h, w = (int(d) for d in call.args[0].ty.shape)
        o, ci, p, q = (int(d) for d in call.args[1].ty.shape)
    except (TypeError, AttributeError):  # symbolic or unknown shapes
        return None
    out_dtype = str(a.out_dtype) if a.out_dtype is not None else ""
    if out_dtype not in ("", "void", str(call.args[0].ty.dtype)):
        return None
    if ci != c or [int(v) for v in a.strides] != [p, q] or h % p or w % q:
        return None
    if p == q == 1:  # a pointwise conv: conv_gemm computes it in NCHW, with no transposes around it
        return None
    return (n, c, h, w), (o, p, q)
