"""A quantized value read back as float in the same kernel stays float: no round trip through bytes.

A QDQ model dequantizes what it has just quantized (a MatMul's output QuantizeLinear -> Dequantize-
Linear -> the bias Add), and FuseOps puts both into one kernel, where TVM's legalisation writes

    float32(int32(uint8(c)) - z),   c = max(min(round(v) + z', 255.0), 0.0)   (a float)

c is already a whole number inside the byte's range (rounded, shifted by a whole number, clipped to
whole bounds), so the casts to bytes and back change nothing: the expression equals ``c - float(z)``
exactly (both small whole numbers). This pass rewrites it so, in every kernel: one subtraction
instead of a float -> int conversion, an integer subtraction and an int -> float conversion per
value (in the write-back of every int8 matmul of an ORT QDQ copy, attention's included).
"""

from __future__ import annotations

RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def requant_casts_pass():
    """A TIR module pass: the rewrite above in every PrimFunc."""
    from effc.codegen.tir_rewrite import marked_stmt_pass

    return marked_stmt_pass("EffcRequantCasts", None, _rewrite)


def _rewrite(node):
    """``node`` rewritten when it is float32(int32(byte(c)) [- z]) with c a whole number in range."""
    from tvm import tirx

    if not isinstance(node, tirx.Cast) or str(node.ty) != "float32":
        return node
    inner, zero = node.value, None
    if isinstance(inner, tirx.Sub) and isinstance(inner.b, tirx.IntImm):
        inner, zero = inner.a, int(inner.b.value)
    if not (isinstance(inner, tirx.Cast) and str(inner.ty) == "int32"):
        return node
    byte = inner.value
    if not (isinstance(byte, tirx.Cast) and str(byte.ty) in RANGES):
        return node
    clipped = byte.value
    if str(clipped.ty) != "float32" or not _whole_within(clipped, *RANGES[str(byte.ty)]):
        return node
    return clipped if not zero else tirx.Sub(clipped, tirx.FloatImm("float32", float(zero)))


def _whole_within(expr, low: int, high: int) -> bool:
    """expr = max(min(w, hi), lo) (nested either way) with w a whole number, every bound a whole number in [low, high]."""
    from tvm import tirx

    bounds = []
    while isinstance(expr, (tirx.Max, tirx.Min)) and isinstance(expr.b, tirx.FloatImm):
        bounds.append((type(expr), float(expr.b.value)))
        expr = expr.a
    # after the innermost min the value stays <= high, after the innermost max >= low, when every
    # bound is a whole number inside [low, high]
    kinds = {kind for kind, _ in bounds}
    if kinds != {tirx.Max, tirx.Min} or any(v != int(v) or not low <= v <= high for _, v in bounds):
        return False
    return _whole(expr)


def _whole(expr) -> bool:
    """expr is a float32 whole number: round(x), or a whole-number constant added to one."""
    from tvm import tirx
    from tvm.ir.expr import Call

    if isinstance(expr, tirx.FloatImm):
        return float(expr.value) == int(expr.value)
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        return _whole(expr.a) and _whole(expr.b)
    return isinstance(expr, Call) and getattr(expr.op, "name", "") in ("tirx.round", "tirx.nearbyint")
