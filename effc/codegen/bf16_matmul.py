"""--precision bf16: float matmuls computed from bf16 operands with fp32 accumulation.

``matmul(x, w)`` becomes ``matmul(astype(x, bf16), astype(w, bf16), out_dtype=f32)``. A weight's
astype is weight-only, so effc.codegen.prefold evaluates it once at compile time (the shipped
param is bf16, half the bytes); an activation's astype fuses into the kernel that produces it
or, failing that, into the matmul kernel, where the bf16 matmul rule
(schedules/cpu/matmul_bf16.py) converts it once per call, never per tile. The product keeps
fp32 accumulation, so the epilogue (bias, GELU, residual add, scale) still runs in fp32.
"""

from __future__ import annotations

from effc.codegen.relax_rewrite import mutator_pass

BF16 = "bfloat16"


def bf16_matmul_pass():
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class Bf16Matmul(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.matmul" or len(call.args) != 2:
                return call
            a, b = call.args
            if any(str(getattr(x.ty, "dtype", "")) != "float32" for x in (a, b)):
                return call
            out = str(getattr(call.attrs, "out_dtype", ""))
            if out not in ("", "void", "None", "float32"):
                return call
            return relax.op.matmul(relax.op.astype(a, BF16), relax.op.astype(b, BF16), out_dtype="float32")

    import tvm

    # q, k and v's matmuls each cast the same layer-norm output: one cast, which then fuses into
    # the layer norm's kernel (three separate casts kept the norm's fp32 output and three passes)
    return tvm.transform.Sequential([mutator_pass(Bf16Matmul, "EffcBf16Matmul"),
                                     relax.transform.EliminateCommonSubexpr()])
