"""Elementwise ops after a conv GEMM's reshape to NCHW run before it, on the [n, o, pixels] product.

conv_gemm computes a conv as out[n, o, pixels] and reshapes it to NCHW. FuseOps fuses a GEMM only
with elementwise ops right after it, and a reshape is not elementwise, so the bias, ReLU and
residual add that follow a conv would be a separate kernel re-reading the whole output. Rewritten
as ``reshape(op(out, other'), NCHW)`` (other' the per-channel bias as [1, o, 1], a scalar as is, or a
same-shaped tensor in the unsplit layout) they fuse into the GEMM's tile write-back; the reshape
that is left is a view. Repeated, a whole chain (bias, GELU's multiplies and erf, a residual add)
moves above the reshape; so do per-tensor QuantizeLinear/DequantizeLinear (a QDQ conv's
requantisation and a residual Add between DQs: effc.codegen.qdq_conv).
"""

from __future__ import annotations

import math

from effc.codegen.conv_gemm import GEMM_PREFIX
from effc.codegen.relax_rewrite import mutator_pass

UNARY = ("relax.nn.relu", "relax.astype", "relax.nn.gelu", "relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.erf",
         "relax.exp", "relax.sqrt", "relax.negative", "relax.abs")
QDQ = ("relax.quantize", "relax.dequantize")  # a QDQ conv's output QuantizeLinear, its residual's DQ
BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum")


def static_shape(expr) -> list[int] | None:
    from tvm import tirx

    shape = getattr(getattr(expr, "ty", None), "shape", None)
    dims = list(getattr(shape, "values", shape) or []) if shape is not None else None
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def sink_reshape_pass():
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class SinkReshape(PyExprMutator):
        def __init__(self, mod=None):
            super().__init__(mod)
            self.sunk = set()

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name == "relax.reshape":  # of a reshape: one reshape, or none (an int8 conv's flat view
                return self._fold_reshapes(call)  # of the previous conv's product: effc.codegen.qdq_conv)
            if name in QDQ:  # (de)quantize per tensor: the data moves, the scalar scale and zero point stay
                if len(call.args) != 3 or any(static_shape(a) not in ([], [1]) for a in call.args[1:]):
                    return call
                split = self._split(call.args[0])
                if split is None:
                    return call
                inner = self.builder_.emit(relax.Call(call.op, [split[0], *call.args[1:]], call.attrs, call.ty_args))
                self.sunk.add(inner)
                return relax.op.reshape(inner, split[1])
            if name not in UNARY + BINARY or len(call.args) != (1 if name in UNARY else 2):
                return call
            split = next((s for s in (self._split(a) for a in call.args) if s is not None), None)
            if split is None:
                return call
            source, full = split
            merged = static_shape(source)
            args = [self._in_merged(a, merged, full) for a in call.args]
            if any(a is None for a in args):
                return call
            inner = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
            self.sunk.add(inner)
            return relax.op.reshape(inner, full)

        def _fold_reshapes(self, call):
            source = self.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else None
            if not isinstance(source, relax.Call) or getattr(source.op, "name", None) != "relax.reshape":
                return call
            inner, shape = source.args[0], getattr(call.args[1], "values", None)
            if shape is not None and static_shape(inner) == [int(v) for v in shape]:
                return inner
            return relax.op.reshape(inner, call.args[1])

        def _split(self, arg):
            """(source, shape) when ``arg`` is reshape(source, shape) that splits source's last axis."""
            if not isinstance(arg, relax.Var):
                return None
            bound = self.lookup_binding(arg)
            if not isinstance(bound, relax.Call) or getattr(bound.op, "name", None) != "relax.reshape":
                return None
            source, full = bound.args[0], static_shape(arg)
            if not self._from_gemm(source):
                return None
            merged = static_shape(source)
            if merged is None or full is None or len(merged) < 1 or len(full) <= len(merged):
                return None
            lead = len(merged) - 1
            if full[:lead] != merged[:lead] or math.prod(full[lead:]) != merged[-1]:
                return None
            return source, full

        def _from_gemm(self, var) -> bool:
            """``var`` is a conv GEMM's output, or an op already moved above its reshape: other
            reshapes (a transformer's head split) are left alone."""
            if var in self.sunk:
                return True
            bound = self.lookup_binding(var) if isinstance(var, relax.Var) else None
            if not isinstance(bound, relax.Call) or getattr(bound.op, "name", None) != "relax.call_tir":
                return False
            return getattr(bound.args[0], "name_hint", "").startswith(GEMM_PREFIX)

        def _in_merged(self, arg, merged, full):
            """``arg`` (broadcast against ``full``) in the merged layout, or None if it has none."""
            shape = static_shape(arg)
            if shape is None:
                return None
            if not shape or math.prod(shape) == 1 and len(shape) <= len(full):
                return arg if not shape else relax.op.reshape(arg, [1] * len(merged))
            split = self._split(arg)
            if split is not None and static_shape(split[0]) == merged and split[1] == full:
                return split[0]
            aligned = [1] * (len(full) - len(shape)) + shape
            lead = len(merged) - 1
            if aligned == full:
                bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
                if isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.dequantize" and \
                        all(static_shape(a) in ([], [1]) for a in bound.args[1:]):
                    # a residual read as bytes: the reshape a view of them, the dequantize in the write-back
                    data = self.builder_.emit(relax.op.reshape(bound.args[0], merged))
                    return self.builder_.emit(relax.Call(bound.op, [data, *bound.args[1:]], bound.attrs, bound.ty_args))
                return self.builder_.emit(relax.op.reshape(arg, merged))
            if all(d == 1 for d in aligned[lead:]) and all(a in (1, f) for a, f in zip(aligned, full)):
                return self.builder_.emit(relax.op.reshape(arg, aligned[:lead] + [1]))
            return None

    return mutator_pass(SinkReshape, "EffcSinkReshape")
