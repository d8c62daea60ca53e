"""Quantizing by a constant scale multiplies by its reciprocal instead of dividing.

TVM legalises QuantizeLinear as ``round(x / scale) + zero_point``: one vdivps per 16 values, ~16
cycles each on Intel cores against half a cycle for a multiply, in the write-back of every int8
matmul of a QDQ model (bert-base: 709 in model.so; fc1's two quantizes were ~40% of its time on AMX).
``round(x * (1 / scale))`` differs from ``round(x / scale)`` only where x / scale lies within one
float ulp of a rounding boundary (a half): a one-step difference of the quantized value, inside
the QDQ tolerance effc verifies against (effc.codegen.qdq_tolerance). Divisions outside a round
(float arithmetic the model wrote) are left exact."""

from __future__ import annotations


def reciprocal_divide_pass():
    """A TIR module pass: round(x / c) -> round(x * (1 / c)) for a float32 constant c in every PrimFunc."""
    from effc.codegen.tir_rewrite import marked_stmt_pass

    return marked_stmt_pass("EffcReciprocalDivide", None, _rewrite)


def _rewrite(node):
    from tvm import tirx
    from tvm.ir.expr import Call

    if not (isinstance(node, Call) and getattr(node.op, "name", "") in ("tirx.round", "tirx.nearbyint")
            and len(node.args) == 1):
        return node
    div = node.args[0]
    if not (isinstance(div, tirx.Div) and isinstance(div.b, tirx.FloatImm) and str(div.b.ty) == "float32"
            and float(div.b.value) != 0.0):
        return node
    product = tirx.Mul(div.a, tirx.FloatImm("float32", 1.0 / float(div.b.value)))
    return tirx.round(product) if node.op.name == "tirx.round" else tirx.nearbyint(product)
