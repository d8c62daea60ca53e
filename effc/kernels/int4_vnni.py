"""CPU kernel for int4 weight-only matmuls on AVX-512 VNNI: int8 activations, ``vpdpbusd``.

    Y[m, n] = sum_b sw[b, n] * sx[m, b] * (sum_{k in b} q[k, n] * xq[m, k] - zp[b, n] * sum_{k in b} xq[m, k])

what ONNX Runtime's MatMulNBits computes at accuracy level 4 (its default for a fused DQ -> MatMul):
each row of X is quantized per weight block to s8 (symmetric, sx = max|x| / 127, round half to
even), and the nibbles (0..15, the unsigned operand) are multiplied by the s8 activations with
``vpdpbusd``, 4 k per int32 lane. One 64-byte load holds 16 columns x 8 k: byte t of a column's word
is q[8g + t] | q[8g + 4 + t] << 4, so a mask gives the first 4 k and a shift and a mask the next 4,
each one vpdpbusd against 4 bytes of xq broadcast. Per block the int32 sums get the zero-point
term and the two scales, in float. About 7 vector ops per 128 multiply-adds, against 5 per 16 for
the float unpacking of effc.kernels.int4_cpu (which stays the exact kernel and the one for CPUs
without VNNI).

Layout (``pack``): words uint32 [N_pad / P, K / 8, P], scales float32 and zero points uint8
[N_pad / P, K / block, P] (P = nv * 16 columns of a panel).
"""

from __future__ import annotations

import functools

import numpy as np

from effc.kernels.int4_cpu import LANES, NIBBLES, Packed, pack_panels, panel_vectors, tile_rows

VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def pack(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int, panel: int) -> Packed:
    """q: unsigned nibbles [K, N]; scale float [K/block, N]; zp [K/block, N] (0..15). Byte t of a
    word holds k rows t (low nibble) and t + 4 (high nibble) of its 8."""
    def byte_pairs(q):
        words = np.zeros((q.shape[0] // NIBBLES, q.shape[1]), np.uint32)
        for t in range(4):
            words |= (q[t::NIBBLES] | (q[t + 4::NIBBLES] << np.uint32(4))) << np.uint32(8 * t)
        return words

    return pack_panels(q, scale, zp, block, panel, byte_pairs)


def quantize_rows(x: np.ndarray, block: int):
    """(xq int8, sx float32 [m, K/block], xsum int32 [m, K/block]): the activations as the kernel
    quantizes them (for the reference)."""
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    sx = (np.abs(xb).max(axis=2) / 127).astype(np.float32)
    safe = np.where(sx == 0, np.float32(1), sx)
    xq = np.clip(np.rint(xb / safe[..., None]), -127, 127).astype(np.int8)
    return xq.reshape(m, k), sx, xq.astype(np.int32).sum(axis=2)


def reference(x, q, scale, zp, block):
    xq, sx, _ = quantize_rows(x.astype(np.float32), block)
    xd = (xq.reshape(len(x), -1, block) * sx[..., None]).reshape(x.shape).astype(np.float64)
    w = (q.astype(np.float64) - np.repeat(zp.astype(np.float64), block, axis=0)) * np.repeat(scale, block, axis=0)
    return xd @ w


@functools.cache
def prim_func(m: int, k: int, n_pad: int, block: int, nv: int):
    from tvm.script import tirx as T

    mr, p = tile_rows(m), nv * LANES
    panels, kb, groups = n_pad // p, k // block, block // NIBBLES
    # a decode step's few rows are quantized by the calling thread: a second parallel launch per
    # matmul costs more than the work (and on a busy machine, a wait for a descheduled worker)
    rows_loop = T.parallel if m >= 16 else T.serial

    @T.prim_func(s_tir=True)
    def int4_vnni(x: T.Buffer((m, k), "float32"), words: T.Buffer((panels, k // NIBBLES, p), "uint32"),
                  scales: T.Buffer((panels, kb, p), "float32"), zeros: T.Buffer((panels, kb, p), "uint8"),
                  y: T.Buffer((m, n_pad), "float32")):
        T.func_attr({"global_symbol": "int4_vnni", "tirx.noalias": True})
        xq = T.alloc_buffer((m, k), "int8")
        sx = T.alloc_buffer((m, kb), "float32")
        xsum = T.alloc_buffer((m, kb), "int32")
        # the activations, per row and weight block, to s8 (ONNX Runtime's accuracy level 4)
        for r in rows_loop(m):
            for b in range(kb):
                amax = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "int32", scope="local")
                amax[0] = T.float32(0)
                total[0] = 0
                for j in range(block):
                    amax[0] = T.max(amax[0], T.fabs(x[r, b * block + j]))
                sx[r, b] = amax[0] / T.float32(127)
                for j in range(block):
                    xq[r, b * block + j] = T.Cast("int8", T.round(
                        x[r, b * block + j] * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0],
                                                             T.float32(0))))
                    total[0] = total[0] + T.Cast("int32", xq[r, b * block + j])
                xsum[r, b] = total[0]
        xw = T.decl_buffer((m, k // 4), "int32", data=xq.data)  # 4 bytes of xq as one word
        for nb in T.parallel(panels):
            acc = T.alloc_buffer((mr, p), "float32", scope="local")
            dot = T.alloc_buffer((mr, p), "int32", scope="local")
            for mo in range(m // mr):
                for r, v in T.grid(mr, nv):
                    acc[r, T.Ramp(v * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for b in range(kb):
                    for r, v in T.grid(mr, nv):
                        dot[r, T.Ramp(v * LANES, 1, LANES)] = T.Broadcast(0, LANES)
                    for g in range(groups):
                        for v in T.unroll(nv):
                            word = words[nb, b * groups + g, T.Ramp(v * LANES, 1, LANES)]
                            mask = T.Broadcast(T.uint32(0x0F0F0F0F), LANES)
                            lo = T.reinterpret("int8x64", T.bitwise_and(word, mask))
                            hi = T.reinterpret("int8x64", T.bitwise_and(
                                T.shift_right(word, T.Broadcast(T.uint32(4), LANES)), mask))
                            for r in T.unroll(mr):
                                row = mo * mr + r
                                quad = (b * block + g * NIBBLES) // 4
                                d = dot[r, T.Ramp(v * LANES, 1, LANES)]
                                d = T.call_llvm_pure_intrin("int32x16", VPDPBUSD, d, lo,
                                                            T.reinterpret("int8x64", T.Broadcast(xw[row, quad], LANES)))
                                dot[r, T.Ramp(v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                    "int32x16", VPDPBUSD, d, hi,
                                    T.reinterpret("int8x64", T.Broadcast(xw[row, quad + 1], LANES)))
                    for r in T.unroll(mr):
                        for v in T.unroll(nv):
                            zero = T.Cast("int32x16", zeros[nb, b, T.Ramp(v * LANES, 1, LANES)])
                            fixed = dot[r, T.Ramp(v * LANES, 1, LANES)] - \
                                zero * T.Broadcast(xsum[mo * mr + r, b], LANES)
                            acc[r, T.Ramp(v * LANES, 1, LANES)] = acc[r, T.Ramp(v * LANES, 1, LANES)] + \
                                T.Cast("float32x16", fixed) * scales[nb, b, T.Ramp(v * LANES, 1, LANES)] * \
                                T.Broadcast(sx[mo * mr + r, b], LANES)
                for r, v in T.grid(mr, nv):
                    y[mo * mr + r, T.Ramp(nb * p + v * LANES, 1, LANES)] = acc[r, T.Ramp(v * LANES, 1, LANES)]

    return int4_vnni


__all__ = ["pack", "prim_func", "panel_vectors", "reference"]
