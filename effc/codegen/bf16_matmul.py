"""--precision bf16: float matmuls computed from bf16 operands with fp32 accumulation.

``matmul(x, w)`` becomes ``matmul(astype(x, bf16), astype(w, bf16), out_dtype=f32)``. A weight's
astype is weight-only, so effc.codegen.prefold evaluates it once at compile time (the shipped
param is bf16, half the bytes); an activation's astype fuses into the kernel that produces it
or, failing that, into the matmul kernel, where the bf16 matmul rule
(schedules/cpu/matmul_bf16.py) converts it once per call, never per tile. The product keeps
fp32 accumulation, so the epilogue (bias, GELU, residual add, scale) still runs in fp32. Where B is
a transpose of its source's rows (attention's K^T), the product reads K's rows instead
(effc.codegen.product_nt): no K^T kernel; the bf16 rule's C tile packs its panels from the rows.
"""

from __future__ import annotations

from effc.codegen.product_nt import product_nt, rows_transposed
from effc.codegen.relax_rewrite import mutator_pass

BF16 = "bfloat16"
# ops that only move elements: an operand reached through them is cast before them instead, so the
# cast fuses into the producing kernel's epilogue (attention's q, k, v: the linear writes bf16) and
# the head split / transpose moves half the bytes and converts nothing
LAYOUT_OPS = ("relax.reshape", "relax.permute_dims")
MAX_LAYOUT_CHAIN = 4


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
            b_t = rows_transposed(self.builder_, b)  # attention's K^T: read K's rows instead
            if b_t is not None:
                b_t = relax.op.permute_dims(self.as_bf16(b_t.args[0]), b_t.attrs.axes)
                return product_nt(self.builder_, self.as_bf16(a), b_t, "float32")
            return relax.op.matmul(self.as_bf16(a), self.as_bf16(b), out_dtype="float32")

        def as_bf16(self, x):
            """astype(x, bf16), the cast moved ahead of the layout ops that made x."""
            chain, source = [], x
            while len(chain) < MAX_LAYOUT_CHAIN and isinstance(source, relax.Var):
                bound = self.lookup_binding(source)
                if not (isinstance(bound, relax.Call) and getattr(bound.op, "name", None) in LAYOUT_OPS):
                    break
                chain.append(bound)
                source = bound.args[0]
            out = relax.op.astype(self.visit_expr(source), BF16)
            for op in reversed(chain):
                out = self.builder_.normalize(relax.Call(op.op, [out, *op.args[1:]], op.attrs, op.ty_args))
            return out

    import tvm

    # q, k and v's matmuls each cast the same layer-norm output: one cast, which then fuses into
    # the layer norm's kernel (three separate casts kept the norm's fp32 output and three passes)
    return tvm.transform.Sequential([mutator_pass(Bf16Matmul, "EffcBf16Matmul"),
                                     relax.transform.EliminateCommonSubexpr()])
