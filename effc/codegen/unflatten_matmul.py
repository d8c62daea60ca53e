"""Drop the reshapes around a linear whose input was flattened to 2-D for the product.

GPT-2's Conv1D (and torch's addmm export of a linear generally) computes
``reshape(matmul(reshape(x, [M, K]), W), [..., N])`` with x of shape [..., K]. FuseOps fuses a
matmul only with elementwise ops after it, and a reshape is not elementwise, so the GELU or the
residual add after the second reshape becomes a separate kernel that re-reads the whole product.
Written as ``matmul(x, W)`` (the same batched product effc's matmul rule schedules for ViT and
BERT) it fuses as their linears do, into the tile write-back.

The product may be any precision's: bf16 operands with ``out_dtype`` float32
(effc.codegen.bf16_matmul), or the int8 QDQ form (effc.codegen.qdq_lowering), whose
``float(acc + comp) * scale (+ C)`` and the output's quantize sit between the product and the
reshape. Such a chain moves after the product unchanged: every op in it is elementwise with
per-column operands (a scalar or an [N] vector broadcasts alike against [M, N] and [..., N]), a
quantize's / dequantize's axis is moved from the 2-D last axis to the N-D one.
"""

from __future__ import annotations

import numpy as np

from effc.codegen.relax_rewrite import mutator_pass

# elementwise ops that may sit between the 2-D product and the reshape back (the QDQ write-back,
# a Gemm's bias); their other operands must be per-column
EPILOGUE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.astype",
                "relax.quantize", "relax.dequantize")
QUANT_OPS = ("relax.quantize", "relax.dequantize")
MAX_EPILOGUE = 6


def _static(shape) -> list[int] | None:
    from tvm import tirx

    dims = list(getattr(shape, "values", shape) or [])
    return [int(d) for d in dims] if dims and all(isinstance(d, tirx.IntImm) for d in dims) else None


def _ndim(expr) -> int:
    return int(getattr(expr.ty, "ndim", -1))


def _per_column(expr) -> bool:
    """A scalar or 1-D operand: broadcast against [M, N] or [..., N] it meets the same columns."""
    return 0 <= _ndim(expr) <= 1


def unflatten_matmul_pass():
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class UnflattenMatmul(PyExprMutator):
        def visit_function_(self, func):
            # Users per variable: a flattened product (or a step of its write-back) that something
            # else also reads is left alone (rewriting it would compute the product twice).
            self.users = {}
            for block in getattr(func.body, "blocks", []):
                if isinstance(block, relax.DataflowBlock):
                    for var, users in relax.analysis.udchain(block).items():
                        self.users[var] = len(users)
            return super().visit_function_(func)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            found = self._flattened_input(call)
            if not found:
                return call
            x, product, chain = found
            out = relax.op.matmul(x, product.args[1], out_dtype=product.attrs.out_dtype)
            for op, at in reversed(chain):
                out = self.builder_.normalize(self._replay(op, at, out, _ndim(x)))
            return out

        @staticmethod
        def _replay(op, at, value, ndim):
            """``op`` with its chain operand (position ``at``) replaced by the N-D ``value``."""
            if op.op.name in QUANT_OPS:
                make = relax.op.quantize if op.op.name == "relax.quantize" else relax.op.dequantize
                return make(value, op.args[1], op.args[2], axis=ndim - 1, out_dtype=op.attrs.out_dtype)
            args = list(op.args)
            args[at] = value
            return relax.Call(op.op, args, op.attrs, op.ty_args)

        def _epilogue_step(self, var):
            """(binding, position of ``var``'s predecessor in it) when ``var`` is one write-back op."""
            bound = self.lookup_binding(var)
            name = getattr(getattr(bound, "op", None), "name", None)
            if name not in EPILOGUE_OPS or _ndim(bound) != 2:
                return None
            if name in QUANT_OPS:
                axis = int(bound.attrs.axis)
                per_column = axis in (1, -1) or all(_ndim(a) == 0 for a in bound.args[1:])
                return (bound, 0) if per_column and all(_per_column(a) for a in bound.args[1:]) else None
            at = [i for i, a in enumerate(bound.args) if _ndim(a) == 2]
            if len(at) != 1 or not isinstance(bound.args[at[0]], relax.Var):
                return None
            others = [a for i, a in enumerate(bound.args) if i != at[0]]
            return (bound, at[0]) if all(_per_column(a) for a in others) else None

        def _flattened_input(self, call):
            """(x, product, write-back chain, last op first) when ``call`` is
            reshape(chain(matmul(reshape(s, [M, K]), W)), [..., N]) with M the product of the
            leading dims; x is s, or s reshaped to [..., K] where s has another shape."""
            if getattr(call.op, "name", None) != "relax.reshape" or not isinstance(call.args[0], relax.Var):
                return None
            var, chain = call.args[0], []
            while True:
                if self.users.get(var, 0) != 1:
                    return None
                product = self.lookup_binding(var)
                if isinstance(product, relax.Call) and getattr(product.op, "name", None) == "relax.matmul":
                    break
                step = self._epilogue_step(var)
                if step is None or len(chain) == MAX_EPILOGUE:
                    return None
                chain.append(step)
                var = step[0].args[step[1]]
            if not isinstance(product.args[0], relax.Var):
                return None
            flatten = self.lookup_binding(product.args[0])
            if not isinstance(flatten, relax.Call) or getattr(flatten.op, "name", None) != "relax.reshape":
                return None
            x, weight = flatten.args[0], product.args[1]
            x_shape, w_shape = _static(x.ty.shape), _static(weight.ty.shape)
            flat_shape, out_shape = _static(flatten.ty.shape), _static(call.ty.shape)
            if not x_shape or not w_shape or not flat_shape or not out_shape or len(w_shape) != 2:
                return None
            if len(flat_shape) != 2 or len(out_shape) < 3 or out_shape[-1] != w_shape[1]:
                return None
            if int(np.prod(out_shape[:-1])) != flat_shape[0]:
                return None
            if x_shape != out_shape[:-1] + [w_shape[0]]:
                # flattened from another layout (attention's merged heads, [B, S, H, D] -> [B*S, H*D]):
                # reshape it to the output's rows instead, a layout op like the one it replaces
                x = self.builder_.emit(relax.op.reshape(x, out_shape[:-1] + [w_shape[0]]))
            return x, product, chain

    return mutator_pass(UnflattenMatmul, "EffcUnflattenMatmul")
