"""CPU kernel for int4 weight-only matmuls (blocked DequantizeLinear -> MatMul), AVX-512.

    Y[m, n] = sum_b scale[b, n] * sum_{k in block b} X[m, k] * (q[k, n] - zp[b, n])

The weight stays 4-bit in memory and is unpacked in registers: each 32-bit lane of a packed word
holds the 8 nibbles of 8 consecutive k of one output column, so one 64-byte load gives 16 columns
x 8 k; per k a shift and a mask select the nibble (vpsrld, vpandd), the block's zero point is
subtracted as int32 (loaded once per block from a byte per column), the int is converted to float
(vcvtdq2ps) and multiplied into an mr x nv register tile of block sums by broadcasts of X; at the
end of each block the tile is scaled by the block's scales and added to the result tile.
Parallel over panels of nv * 16 output columns; M in tiles of mr rows (mr divides M: 1 for a
decode step, 4 for a prefill). N is padded to whole panels (zero scales), the caller slices.

Layout (``pack``): words uint32 [N_pad / P, K / 8, P] (P = nv * 16 columns of one panel, all k of a
panel one contiguous stream), scales float32 and zero points uint8 [N_pad / P, K / block, P].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

LANES = 16
NIBBLES = 8  # k per 32-bit lane


@dataclass(frozen=True)
class Packed:
    words: np.ndarray  # uint32 [N_pad / P, K / 8, P]
    scales: np.ndarray  # float32 [N_pad / P, K / block, P]
    zeros: np.ndarray  # uint8 [N_pad / P, K / block, P]
    n: int
    block: int


def misfit(k: int, n: int, block: int) -> str | None:
    if block % NIBBLES:
        return f"block size {block} is not a multiple of {NIBBLES}"
    if k % block:
        return f"K={k} is not a multiple of the block size {block}"
    return None


def pack(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int, panel: int) -> Packed:
    """q: unsigned nibbles [K, N] (0..15); scale float [K/block, N]; zp [K/block, N] (0..15).
    Nibble s of a word is k row s of its 8."""
    def in_order(q):
        words = np.zeros((q.shape[0] // NIBBLES, q.shape[1]), np.uint32)
        for s in range(NIBBLES):
            words |= q[s::NIBBLES] << np.uint32(4 * s)
        return words

    return pack_panels(q, scale, zp, block, panel, in_order)


def pack_panels(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int, panel: int, to_words) -> Packed:
    """N padded to whole panels, each array as [N_pad / panel, rows, panel]; ``to_words`` packs the
    padded uint32 nibbles [K, N_pad] into 32-bit words [K / 8, N_pad] (the kernel's nibble order)."""
    k, n = q.shape
    n_pad = -(-n // panel) * panel
    q = np.pad(q.astype(np.uint32), ((0, 0), (0, n_pad - n)))
    scale = np.pad(scale.astype(np.float32), ((0, 0), (0, n_pad - n)))
    zp = np.pad(zp.astype(np.uint8), ((0, 0), (0, n_pad - n)))

    def panels(a):  # [rows, N_pad] -> [N_pad / P, rows, P]
        return np.ascontiguousarray(a.reshape(a.shape[0], n_pad // panel, panel).transpose(1, 0, 2))

    return Packed(panels(to_words(q)), panels(scale), panels(zp), n, block)


def tile_rows(m: int) -> int:
    """mr: the largest of 4, 2, 1 that divides m (no row tail to handle)."""
    return next(r for r in (4, 2, 1) if m % r == 0)


def panel_vectors(m: int) -> int:
    """nv: vectors of 16 columns per panel (mr * nv block sums + as many results in registers)."""
    return 4 if tile_rows(m) == 1 else 2


@functools.cache
def prim_func(m: int, k: int, n_pad: int, block: int, nv: int):
    """TIR for X [m, k] float32 -> Y [m, n_pad] float32 with the packed weight."""
    from tvm.script import tirx as T

    mr, p = tile_rows(m), nv * LANES
    panels, kb, groups = n_pad // p, k // block, block // NIBBLES

    @T.prim_func(s_tir=True)
    def int4_matmul(x: T.Buffer((m, k), "float32"), words: T.Buffer((panels, k // NIBBLES, p), "uint32"),
                    scales: T.Buffer((panels, kb, p), "float32"), zeros: T.Buffer((panels, kb, p), "uint8"),
                    y: T.Buffer((m, n_pad), "float32")):
        T.func_attr({"global_symbol": "int4_matmul", "tirx.noalias": True})
        for nb in T.parallel(panels):
            # per task: registers of its own (allocated outside the loop they would be shared)
            acc = T.alloc_buffer((mr, p), "float32", scope="local")
            part = T.alloc_buffer((mr, p), "float32", scope="local")
            zero = T.alloc_buffer((p,), "int32", scope="local")
            for mo in range(m // mr):
                for r, v in T.grid(mr, nv):
                    acc[r, T.Ramp(v * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for b in range(kb):
                    for v in T.unroll(nv):
                        lanes = T.Ramp(v * LANES, 1, LANES)
                        zero[lanes] = T.Cast("int32x16", zeros[nb, b, lanes])
                    for r, v in T.grid(mr, nv):
                        part[r, T.Ramp(v * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                    for g in range(groups):
                        for s in T.unroll(NIBBLES):
                            for v in T.unroll(nv):
                                word = words[nb, b * groups + g, T.Ramp(v * LANES, 1, LANES)]
                                nib = T.bitwise_and(T.shift_right(word, T.Broadcast(T.uint32(4 * s), LANES)),
                                                    T.Broadcast(T.uint32(15), LANES))
                                w = T.Cast("float32x16",
                                           T.reinterpret("int32x16", nib) - zero[T.Ramp(v * LANES, 1, LANES)])
                                for r in T.unroll(mr):
                                    part[r, T.Ramp(v * LANES, 1, LANES)] = part[r, T.Ramp(v * LANES, 1, LANES)] + \
                                        T.Broadcast(x[mo * mr + r, b * block + g * NIBBLES + s], LANES) * w
                    for r in T.unroll(mr):
                        for v in T.unroll(nv):
                            acc[r, T.Ramp(v * LANES, 1, LANES)] = acc[r, T.Ramp(v * LANES, 1, LANES)] + \
                                part[r, T.Ramp(v * LANES, 1, LANES)] * scales[nb, b, T.Ramp(v * LANES, 1, LANES)]
                for r, v in T.grid(mr, nv):
                    y[mo * mr + r, T.Ramp(nb * p + v * LANES, 1, LANES)] = acc[r, T.Ramp(v * LANES, 1, LANES)]

    return int4_matmul


def reference(x: np.ndarray, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int) -> np.ndarray:
    """What the kernel computes, in numpy (float64)."""
    w = (q.astype(np.float64) - np.repeat(zp.astype(np.float64), block, axis=0)) * np.repeat(scale, block, axis=0)
    return x.astype(np.float64) @ w
