"""Drop the reshapes around a linear whose input was flattened to 2-D for the product.

GPT-2's Conv1D (and torch's addmm export of a linear generally) computes
``reshape(matmul(reshape(x, [M, K]), W), [..., N])`` with x of shape [..., K]. FuseOps fuses a
matmul only with elementwise ops after it, and a reshape is not elementwise, so the GELU or the
residual add after the second reshape becomes a separate kernel that re-reads the whole product.
Written as ``matmul(x, W)`` (the same batched product effc's matmul rule schedules for ViT and
BERT) it fuses as their linears do, into the tile write-back.
"""

from __future__ import annotations

from effc.codegen.relax_rewrite import mutator_pass


def _static(shape) -> list[int] | None:
    from tvm import tirx

    dims = list(getattr(shape, "values", shape) or [])
    return [int(d) for d in dims] if dims and all(isinstance(d, tirx.IntImm) for d in dims) else None


def unflatten_matmul_pass():
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class UnflattenMatmul(PyExprMutator):
        def visit_function_(self, func):
            # Users per variable: a flattened product that something else also reads is left alone
            # (rewriting it would compute the product twice).
            self.users = {}
            for block in getattr(func.body, "blocks", []):
                if isinstance(block, relax.DataflowBlock):
                    for var, users in relax.analysis.udchain(block).items():
                        self.users[var] = len(users)
            return super().visit_function_(func)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            flat = self._flattened_input(call)
            return relax.op.matmul(*flat) if flat else call

        def _flattened_input(self, call):
            """(x, W) when ``call`` is reshape(matmul(reshape(x, [M, K]), W), x.shape[:-1] + [N])."""
            if getattr(call.op, "name", None) != "relax.reshape" or not isinstance(call.args[0], relax.Var):
                return None
            product = self.lookup_binding(call.args[0])
            if (not isinstance(product, relax.Call) or getattr(product.op, "name", None) != "relax.matmul"
                    or self.users.get(call.args[0], 0) != 1 or not isinstance(product.args[0], relax.Var)):
                return None
            flatten = self.lookup_binding(product.args[0])
            if (not isinstance(flatten, relax.Call) or getattr(flatten.op, "name", None) != "relax.reshape"
                    or str(getattr(product.attrs, "out_dtype", "")) not in ("", "void", "None")):
                return None
            x, weight = flatten.args[0], product.args[1]
            x_shape, w_shape = _static(x.ty.shape), _static(weight.ty.shape)
            out_shape = _static(call.ty.shape)
            if not x_shape or not w_shape or not out_shape or len(w_shape) != 2 or len(x_shape) < 3:
                return None
            if x_shape[-1] != w_shape[0] or out_shape != x_shape[:-1] + [w_shape[1]]:
                return None
            return x, weight

    return mutator_pass(UnflattenMatmul, "EffcUnflattenMatmul")
