"""Vectorisable forms of the transcendental functions, applied to Relax before legalisation.

TVM lowers exp, tanh, erf and pow on CPU to scalar libm calls, even inside a vectorised loop: a
GELU or a softmax then runs ~100x slower than a multiply. TVM's FastMathTransform swaps exp, erf,
tanh and softmax for TOPI's polynomial forms (nn.gelu is first spelt out with erf so it gets one too) (relative error ~1e-7..1e-6, within effc's 1e-4
agreement with ONNX Runtime). pow with a small integer constant exponent (GPT-2's tanh GELU uses
x ** 3) becomes exact multiplies (pow_to_multiply_pass), for every target: lower.fuse runs it.
"""

from __future__ import annotations

from effc.codegen.relax_rewrite import mutator_pass


def fast_math_passes() -> list:
    from tvm import relax

    return [_expand_gelu(), relax.transform.FastMathTransform()]


def _expand_gelu():
    """relax.nn.gelu legalises straight to a scalar erf, out of FastMathTransform's reach: spell it
    as 0.5 * x * (1 + erf(x / sqrt 2)) (and the tanh form likewise) so that erf/tanh become fast."""
    import math

    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class ExpandGelu(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name not in ("relax.nn.gelu", "relax.nn.gelu_tanh"):
                return call
            x, op, emit = call.args[0], relax.op, self.builder_.emit
            dtype = str(x.ty.dtype)

            def c(v):
                return relax.const(v, dtype)

            if name == "relax.nn.gelu":
                inner = emit(op.erf(emit(op.multiply(x, c(1 / math.sqrt(2))))))
            else:
                cube = emit(op.multiply(emit(op.multiply(x, x)), x))
                arg = emit(op.add(x, emit(op.multiply(cube, c(0.044715)))))
                inner = emit(op.tanh(emit(op.multiply(arg, c(math.sqrt(2 / math.pi))))))
            return op.multiply(emit(op.multiply(x, c(0.5))), emit(op.add(inner, c(1.0))))

    return mutator_pass(ExpandGelu, "EffcExpandGelu")


def pow_to_multiply_pass():
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class PowToMultiply(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.power" or not isinstance(call.args[1], tvm.ir.expr.Constant):
                return call
            exponent = call.args[1].value.numpy()
            if exponent.size != 1 or float(exponent.reshape(())) not in (2.0, 3.0):
                return call
            x = call.args[0]
            result = relax.op.multiply(x, x)
            if float(exponent.reshape(())) == 3.0:
                result = relax.op.multiply(self.builder_.emit(result), x)
            return result

    return mutator_pass(PowToMultiply, "EffcPowToMultiply")
