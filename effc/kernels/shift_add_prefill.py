"""Prefill (many rows of X) CPU lookup-table kernel for effc.ShiftAddMatMul, hand-written TIR.

The decode kernel (shift_add_cpu) vectorises over output rows and so re-reads every weight byte
once per row of X. Here the rows of X are the vector lanes instead: for each group of 8
activations a table of signed sums is built for R rows of X at once,

    lut[j, u, r] = sum_t (2 bit_t(u) - 1) x[r, 8j + t]      (R floats contiguous per entry)

keeping only u < 128: a byte with bit 7 set looks up its complement and negates the scale
(entry(~u) = -entry(u)), which halves the tables and their build. One weight byte is then one
table offset and R/16 multiply-adds of contiguous table vectors by its power-of-two scale; each
weight byte is read M/R times instead of M. Offsets (index * R) and signed scales (the stored
float exponent field shifted into place, field 0 = +0.0 = "no term", sign from bit 7) are
decoded 16 at a time into small stack buffers first, so that a lookup is one offset load, one
scale broadcast load and R/16 FMAs with a memory operand (decoding per lookup took half the time).
The decode runs one output block ahead of the lookups (two slots): read straight after the wide
stores that wrote them, the scalar loads waited on store forwarding (10% of the kernel's time).

Blocking: tables for KB activations x R rows (KB/8 x 128 x R floats, 64 KB at KB=32, R=32)
stay in L1/L2 while every output row streams its KB/8 bytes per plane; partial sums go to a
scratch [N, R] (contiguous vectors) between blocks and into Y from the registers after the
last. Tables are built from two 16-entry halves (one add per entry). Parallel over blocks of R
rows of X (no sharing between tasks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from effc.kernels._layout import fold_signs

LANES = 16       # float32 lanes of a zmm register
ROWS = 32        # rows of X per table entry (two vectors: index decode amortised over two FMAs)
K_BLOCK = 32     # activations per table block (measured best of 8..128 at R=32)
OUTS = 4         # output rows accumulated at once (independent FMA chains)


@dataclass(frozen=True)
class PackedPrefill:
    """Kernel layout: per (K block, OUTS output rows) one contiguous run of bytes and one of float
    exponent fields, each ordered (output row, plane, byte)."""

    bits: np.ndarray  # uint8 [K/KB, N/OUTS, OUTS*q*KB/8], negative scales folded in (bytes inverted)
    exps: np.ndarray  # uint8 [K/KB, N/OUTS, OUTS*q*KB/8], float32 exponent field of |scale| (0: no term)
    q: int
    group: int
    k_block: int
    outs: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.q, self.bits.shape[1] * self.outs, self.bits.shape[0] * self.k_block


def block_for(k: int, group: int, k_block: int = K_BLOCK) -> int:
    """The largest table block <= k_block that tiles K and holds whole scale groups."""
    return next((b for b in range(k_block - k_block % group, 0, -group) if k % b == 0), group)


def pack_prefill(planes: np.ndarray, codes: np.ndarray, k_block: int = K_BLOCK, outs: int = OUTS) -> PackedPrefill:
    bits, field, group = fold_signs(planes, codes)
    q, n, kb = bits.shape
    k_block = block_for(kb * 8, group, k_block)
    if (kb * 8) % k_block or k_block % group or n % outs:
        raise ValueError(f"K={kb * 8}, N={n} do not fit {k_block}-activation blocks (group {group}) "
                         f"and {outs}-row output blocks")
    field = np.repeat(field, group // 8, axis=2)  # one per byte: its sign is folded in per byte at run time
    blocks = kb * 8 // k_block

    def blocked(a: np.ndarray) -> np.ndarray:  # [q, N, C] -> [K/KB, N/OUTS, OUTS * q * C/(K/KB)]
        a = a.reshape(q, n, blocks, a.shape[2] // blocks).transpose(2, 1, 0, 3)
        return np.ascontiguousarray(a.reshape(blocks, n // outs, -1))

    return PackedPrefill(blocked(bits), blocked(field), q, group, k_block, outs)


@functools.cache  # one parse per shape: a model's linears share a handful of shapes
def prim_func_prefill(m: int, n: int, k: int, q: int, group: int, k_block: int = K_BLOCK, rows: int = ROWS,
                      outs: int = OUTS):
    """TIR for X [m, k] float32 -> Y [m, n]; m a multiple of ``rows`` (callers pad X)."""
    from tvm.script import tirx as T

    k_block = block_for(k, group, k_block)
    if m % rows or n % outs or rows % LANES or k % k_block or k_block % group or group % 8:
        raise ValueError(f"shape m={m}, n={n}, k={k}, group={group} does not fit the prefill kernel's tiling")
    mb, kbs, jb = m // rows, k // k_block, k_block // 8
    vecs, table = rows // LANES, 128 * rows

    @T.prim_func(s_tir=True)
    def shift_add_prefill(x: T.Buffer((m, k), "float32"), bits: T.Buffer((kbs, n // outs, outs * q * jb), "uint8"),
                          exps: T.Buffer((kbs, n // outs, outs * q * jb), "uint8"), bias: T.Buffer((n,), "float32"),
                          y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "shift_add_prefill", "tirx.noalias": True})
        xt = T.alloc_buffer((mb, k_block, rows), "float32")
        half = T.alloc_buffer((mb, jb * 2, 16, rows), "float32")
        lut = T.alloc_buffer((mb, jb * table), "float32")  # [j, u, r] flat: offsets index it directly
        acc_t = T.alloc_buffer((mb, n, rows), "float32")
        for b in T.parallel(mb):
            for c in range(kbs):
                # This block of X transposed (rows innermost), then 16-entry tables of 4 activations
                # (no let-bindings inside vectorised loops: TVM's vectoriser drops their lanes).
                for kk, r in T.grid(k_block, rows):
                    xt[b, kk, r] = x[b * rows + r, c * k_block + kk]
                for h, a in T.grid(jb * 2, 16):
                    for r in T.vectorized(rows):
                        half[b, h, a, r] = (T.Select((a & 1) == 1, xt[b, h * 4, r], -xt[b, h * 4, r])
                                            + T.Select((a & 2) == 2, xt[b, h * 4 + 1, r], -xt[b, h * 4 + 1, r])
                                            + T.Select((a & 4) == 4, xt[b, h * 4 + 2, r], -xt[b, h * 4 + 2, r])
                                            + T.Select((a & 8) == 8, xt[b, h * 4 + 3, r], -xt[b, h * 4 + 3, r]))
                # 128-entry tables of 8 (bit 7 clear): low nibble from the first half, high from the second.
                for j, u in T.grid(jb, 128):
                    for r in T.vectorized(rows):
                        lut[b, j * table + u * rows + r] = half[b, j * 2, u & 15, r] + half[b, j * 2 + 1, u >> 4, r]
                # Iteration ob decodes output block ob into slot ob % 2 and looks up block ob - 1.
                offset = T.alloc_buffer((2, outs * q * jb), "int32", scope="local")
                scale = T.alloc_buffer((2, outs * q * jb), "float32", scope="local")
                acc = T.alloc_buffer((outs, rows), "float32", scope="local")
                for ob in range(n // outs + 1):
                    if ob < n // outs:
                        for f in T.vectorized(outs * q * jb):  # byte with bit 7 set: -(entry of its complement)
                            offset[ob % 2, f] = T.bitwise_and(T.bitwise_xor(T.Cast("int32", bits[c, ob, f]),
                                                              0 - T.shift_right(T.Cast("int32", bits[c, ob, f]), 7)),
                                                              127) * rows
                            scale[ob % 2, f] = T.reinterpret("float32", T.bitwise_or(
                                T.shift_left(T.Cast("int32", exps[c, ob, f]), 23),
                                T.shift_left(T.shift_right(T.Cast("int32", bits[c, ob, f]), 7), 31)))
                    if ob > 0:
                        for w, v in T.grid(outs, vecs):
                            acc[w, T.Ramp(v * LANES, 1, LANES)] = T.Select(
                                c == 0, T.Broadcast(T.float32(0), LANES),
                                acc_t[b, (ob - 1) * outs + w, T.Ramp(v * LANES, 1, LANES)])
                        for i in range(q):
                            for j in T.unroll(jb):
                                for w in T.unroll(outs):  # independent chains hide the FMA latency
                                    for v in T.unroll(vecs):
                                        acc[w, T.Ramp(v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                            "float32x16", "llvm.fma.v16f32",
                                            lut[b, T.Ramp(j * table + v * LANES
                                                          + offset[(ob - 1) % 2, (w * q + i) * jb + j], 1, LANES)],
                                            T.Broadcast(scale[(ob - 1) % 2, (w * q + i) * jb + j], LANES),
                                            acc[w, T.Ramp(v * LANES, 1, LANES)])
                        if c < kbs - 1:
                            for w, v in T.grid(outs, vecs):
                                acc_t[b, (ob - 1) * outs + w, T.Ramp(v * LANES, 1, LANES)] = acc[w, T.Ramp(v * LANES, 1,
                                                                                                      LANES)]
                        else:  # last block: straight from the registers into Y (no transposing pass over a scratch)
                            for w in T.unroll(outs):
                                for r in T.unroll(rows):
                                    y[b * rows + r, (ob - 1) * outs + w] = acc[w, r] + bias[(ob - 1) * outs + w]

    return shift_add_prefill
