"""QDQ convolutions -> integer GEMMs (the conv half of effc.codegen.qdq_lowering).

``Conv(DQ(x_q), DQ(W_q), bias)`` (x an 8-bit activation quantized per tensor, W a constant 8-bit
weight per tensor or per output channel, the bias float or DQ(int32): what ONNX Runtime's
quantize_static writes) becomes, per image, conv_gemm's NCHW product with bytes for operands:

    acc[n, o, p] = sum_k W_s8[o, k] * col_u8[n, k, p]             (vpdpbusd: W broadcast, col packed)
    y[n, o, p]   = float(acc + comp[o]) * scale[o] (+ bias[o])    comp = -zx * sum_k W[o, k]

``col`` gathers the (channel, tap) bytes each output pixel reads: conv_gemm's im2col as a kernel of
its own (the im2col rule's row copies), from the input copied once into a buffer padded with the zero
point zx, the byte whose real value is 0 (so the one correction comp holds for every pixel, and the
taps read with no bound checks); a pointwise conv's col is its input. An input that is the previous
conv's product is read through its flat [n, c, pixels] view (sink_reshape folds the reshape pair).
The int8 rule packs col into its panels per call. The product keeps the output channels as rows: the
result is NC(H)W with no transpose, and sink_reshape moves what follows (the output QuantizeLinear, a
residual DQ + Add, ReLU) into the tile write-back. An s8 activation is moved to u8 on the way
(x + 128, zx + 128); k is padded to whole 4-byte steps with zero weights. Grouped and depthwise
convs, and anything not fitting the above, stay on the float path with their reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from effc.codegen.qdq_lowering import Plan, _attr, _bias, activation_dtype, dq_operands, weight_refusal

K_STEP = 4  # vpdpbusd's k-bytes per int32 lane: k is padded to a multiple


@dataclass
class ConvPlan(Plan):
    geometry: dict = field(default_factory=dict)  # kernel, strides, pads, dilations (ONNX's attributes)
    x_zero: int = 0  # the activation's zero point as u8 (after the s8 -> u8 move)
    taps: int = 0  # k before padding: channels * prod(kernel)


def plan_conv(graph, node, name: str) -> Plan | None:
    """The plan for one Conv, or None when it is no QDQ conv at all (float, untouched)."""
    operands = dq_operands(graph, node, name)
    if not isinstance(operands, tuple):
        return operands
    (_, x, sx, zx), (dq_w, w_name, sw, zw) = operands
    wq = graph.const(w_name)
    if wq is None:
        return Plan(name, "the weight is not a constant")
    refusal = weight_refusal(name, sx, zx, wq)
    if refusal is not None:
        return refusal
    x_dtype = activation_dtype(zx)
    if wq.ndim not in (3, 4):
        return Plan(name, f"a {wq.ndim - 2}-D conv")
    if _attr(node, "group", 1) != 1:
        return Plan(name, "a grouped or depthwise conv (groups > 1)")
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", ""):
        return Plan(name, "auto_pad")
    o, dims = wq.shape[0], wq.ndim - 2
    if sw.size > 1 and _attr(dq_w, "axis", 1) % wq.ndim != 0:
        return Plan(name, "the weight is not quantized per output channel")
    w = wq.reshape(o, -1).astype(np.int32)
    zw_o = np.zeros(o, np.int32) if zw is None else np.broadcast_to(zw.astype(np.int32).reshape(-1), (o,))
    w = w - zw_o[:, None]
    if w.min() < -128 or w.max() > 127:
        return Plan(name, "the weight minus its zero point does not fit in s8")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _bias(graph, node.input[2])
        if bias is None or bias.size not in (1, o):
            return Plan(name, "the bias is not a constant vector over the output channels")
        bias = np.broadcast_to(bias.reshape(-1), (o,)).astype(np.float32)
    signed = x_dtype == np.int8
    zx_u = (int(zx.reshape(())) if zx is not None else 0) + (128 if signed else 0)
    taps = w.shape[1]
    padded = np.zeros((o, -(-taps // K_STEP) * K_STEP), np.int8)
    padded[:, :taps] = w
    scale = (np.float32(sx.reshape(())) * np.broadcast_to(sw.reshape(-1), (o,))).astype(np.float32)
    geometry = {"kernel": list(wq.shape[2:]), "strides": list(_attr(node, "strides", [1] * dims)),
                "pads": list(_attr(node, "pads", [0] * 2 * dims)),
                "dilations": list(_attr(node, "dilations", [1] * dims))}
    return ConvPlan(name, "", x, signed, padded, (-zx_u * w.sum(axis=1)).astype(np.int32), scale, bias,
                    geometry=geometry, x_zero=zx_u, taps=taps)


def convert_conv(lowering, bb, x, plan: ConvPlan):
    """The Relax form of a planned conv: the int8 GEMM kernel and its float epilogue, in NC(H)W."""
    from tvm import relax

    from effc.codegen.conv_gemm import GEMM_PREFIX, ConvShape

    g = plan.geometry
    x_shape = [int(d) for d in bb.normalize(x).ty.shape]
    o, kp = plan.weight.shape
    w_shape = [o, x_shape[1], *g["kernel"]]
    attrs = SimpleNamespace(groups=1, strides=g["strides"], dilation=g["dilations"], padding=g["pads"])
    conv = ConvShape(x_shape, w_shape, attrs)
    if conv.k != plan.taps:
        from effc.errors import EffcError

        raise EffcError(f"Conv {plan.node}: input channels {x_shape[1]} do not match its weight")
    w = lowering._lift(f"{plan.node}.weight_s8", plan.weight)
    if conv.n > 1:  # the image axis in every operand, as conv_gemm's float GEMM (its module doc)
        w = bb.emit(relax.op.broadcast_to(w, [conv.n, o, kp]))
    if conv.pointwise:  # the input is col: [n, c, pixels], a view
        col = bb.emit(relax.op.reshape(x, [conv.n, conv.c, conv.pixels]))
        col_u8 = lambda ct: _as_u8(ct) if plan.x_signed else ct  # noqa: E731
    else:
        # the gather as a kernel of its own (inside the GEMM's packing of col, its per-byte index
        # arithmetic and bound checks made a 3x3 conv 2.5x slower), reading a previous conv's product
        # through its flat view (through the NCHW view, the reshape fused into the gather cost
        # divisions and modulos per byte: a 3x3 gather at 28 x 28 ran 3x slower)
        if _from_conv_product(bb, x):
            x = bb.emit(relax.op.reshape(x, [conv.n, conv.c, math.prod(conv.spatial)]))
        col = bb.emit_te(lambda xt: _gather(xt, conv, plan), x, primfunc_name_hint="im2col")
        col_u8 = lambda ct: ct  # noqa: E731
    acc = bb.emit_te(lambda wt, ct: _gemm(wt, _pad_k(col_u8(ct), conv, plan, kp), conv, kp), w, col,
                     primfunc_name_hint=GEMM_PREFIX)
    if len(conv.out) > 1:  # NCHW at once: sink_reshape moves the epilogue below back into the GEMM
        acc = bb.emit(relax.op.reshape(acc, [conv.n, o, *conv.out]))
    column = [o] + [1] * len(conv.out)  # per output channel, broadcast over the pixels
    per_channel = lambda name, a: lowering._lift(f"{plan.node}.{name}", a.reshape(column))  # noqa: E731
    if np.any(plan.comp):
        acc = relax.op.add(acc, per_channel("zero_point_comp", plan.comp))
    y = relax.op.multiply(relax.op.astype(acc, "float32"), per_channel("scale", plan.scale))
    if plan.bias is not None:
        y = relax.op.add(y, per_channel("bias", plan.bias))
    return y


def _from_conv_product(bb, x, depth: int = 8) -> bool:
    """``x`` is an elementwise chain (its requantisation, a residual add) on a conv GEMM's product
    reshaped to NC(H)W, as this module emits it (the gather then reads the product's flat view;
    through anything else, a max pool's output, it keeps the NCHW indices)."""
    from tvm import relax

    from effc.codegen.conv_gemm import GEMM_PREFIX

    for _ in range(depth):
        bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else x  # the importer's unbound calls too
        if not isinstance(bound, relax.Call):
            return False
        name = getattr(bound.op, "name", "")
        if name == "relax.call_tir":
            return getattr(bound.args[0], "name_hint", "").startswith(GEMM_PREFIX)
        if name != "relax.reshape" and name not in ELEMENTWISE or not bound.args:
            return False
        x = bound.args[0]
    return False


ELEMENTWISE = ("relax.quantize", "relax.dequantize", "relax.add", "relax.multiply", "relax.astype",
               "relax.nn.relu", "relax.clip", "relax.round", "relax.divide", "relax.subtract", "relax.maximum",
               "relax.minimum")


def _gather(x, conv, plan: ConvPlan):
    """col[n, k, p] as u8: k = (channel, *taps), p = output pixel, row-major. A padded conv first
    copies its input into a zero-point-padded buffer (the gather's kernel computes it once, the
    im2col rule's MATERIALIZE): the taps then read it with no bound checks or clamped indices,
    and a stride-1 tap row is one contiguous vector load."""
    from tvm import te, tirx

    from effc.codegen.conv_gemm import IM2COL
    from effc.codegen.schedules.cpu.im2col import MATERIALIZE

    flat = len(x.shape) == 3 and len(conv.spatial) > 1  # the previous conv's [n, c, pixels] product

    def read(n, c, pos):  # x at spatial position pos, as u8
        if flat:
            offset = 0
            for q, size in zip(pos, conv.spatial):
                offset = offset * size + q
            pos = [offset]
        value = x[(n, c, *pos)]
        if plan.x_signed:  # s8 -> u8, the zero point moved alike (plan_conv)
            value = tirx.Cast("uint8", tirx.Cast("int32", value) + 128)
        return value

    bounded = any(conv.pad_before) or not _inside(conv)
    if bounded:
        extents = [(q - 1) * s + (kk - 1) * d + 1 for q, s, kk, d in zip(conv.out, conv.stride, conv.kernel,
                                                                          conv.dilation)]

        def pad(n, c, *idx):
            pos = [i - b for i, b in zip(idx, conv.pad_before)]
            inside = tirx.all(*[tirx.all(q >= 0, q < size) for q, size in zip(pos, conv.spatial)])
            # the load is clamped into the input too: a vectorised select may evaluate both sides
            safe = [tirx.max(tirx.min(q, size - 1), 0) for q, size in zip(pos, conv.spatial)]
            return tirx.if_then_else(inside, read(n, c, safe), tirx.const(plan.x_zero, "uint8"))

        source = te.compute([conv.n, conv.c, *extents], pad, name="im2col_pad", attrs={MATERIALIZE: 1})
        at = lambda n, c, pos: source[(n, c, *pos)]  # noqa: E731
    else:
        at = read

    def gather(n, k, p):
        taps, out = [], []
        for size in reversed(conv.kernel):  # peel the row-major indices apart, last axis first
            taps.insert(0, k % size)
            k = k // size
        for size in reversed(conv.out):
            out.insert(0, p % size)
            p = p // size
        offset = [0] * len(out) if bounded else conv.pad_before  # the padded buffer starts at -pad
        pos = [q * s + t * d - b for q, s, t, d, b in zip(out, conv.stride, taps, conv.dilation, offset)]
        return at(n, k, pos)

    return te.compute([conv.n, conv.k, conv.pixels], gather, name="im2col_u8",
                      attrs={IM2COL: [conv.c, *conv.kernel, *conv.out]})


def _as_u8(col):
    """An s8 col moved to u8 (computed in the GEMM's packing)."""
    from tvm import te, tirx

    return te.compute(col.shape, lambda *i: tirx.Cast("uint8", tirx.Cast("int32", col[i]) + 128), name="col_u8")


def _pad_k(col, conv, plan: ConvPlan, kp: int):
    """col with k padded to kp (the padded rows meet zero weights; any byte would do)."""
    from tvm import te, tirx

    if kp == conv.k:
        return col
    return te.compute([conv.n, kp, conv.pixels], lambda n, k, p: tirx.if_then_else(
        k < conv.k, col[n, tirx.min(k, conv.k - 1), p], tirx.const(plan.x_zero, "uint8")), name="col_padded")


def _inside(conv) -> bool:
    """True when no tap reads past the input's end (only the padding after can cause it)."""
    return all((q - 1) * s + (kk - 1) * d < size for q, s, kk, d, size in
               zip(conv.out, conv.stride, conv.kernel, conv.dilation, conv.spatial))


def _gemm(w, col, conv, kp: int):
    """acc[n, o, p] = sum_k int32(w[(n,) o, k]) * int32(col[n, k, p]): s8 rows times u8 columns."""
    from tvm import te

    r = te.reduce_axis((0, kp), name="k")
    lead = int(conv.n > 1)
    return te.compute([conv.n, conv.o, conv.pixels],
                      lambda n, o, p: te.sum(w[(*([n] * lead), o, r)].astype("int32") * col[n, r, p].astype("int32"),
                                             axis=r), name="conv_gemm_int8")
