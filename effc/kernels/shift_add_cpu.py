"""CPU lookup-table kernel for effc.ShiftAddMatMul (AVX-512), hand-written TIR built by TVM.

    Y[m, n] = bias[n] + sum_i sum_j alpha[i, n, j] * (sum_t b[i, n, 8j + t] x[m, 8j + t])

No dense weight is ever rebuilt. Per row of X, every group of 4 activations gets a table of its
16 signed sums (one zmm register of float32: ``lut[m, c, u] = sum_t (2 bit_t(u) - 1) x[m, 4c + t]``).
A packed weight byte holds two nibbles, each one index into its table, so 16 output rows' bytes
are looked up by two ``vpermps`` (an in-register 16-way float shuffle: exact, unlike int8 tables)
and their sum is scaled by the group's power of two, whose float is assembled from the exponent
bits (an exponent add, no multiply to form it), then accumulated. Parallel over blocks of
output rows, vectorised over 16 output rows.

The kernel is bound by the vector shuffle unit, so the layout spends no shuffle on unpacking:
each output row's bytes come four to a 32-bit lane (4 consecutive bytes of K, 16 rows = one
64-byte load), and ``vpermps`` reads only the low 4 bits of its index, so a plain shift selects
byte s and its nibble. The exponent fields are packed four groups to a lane the same way. Per
byte and 16 rows that leaves two shuffles (the lookups) and a few integer and float operations.

Kernel layout (``pack``), made once from the op's layout: [N/R, q, C, R] uint32 words (R output
rows per parallel block, C words along K); a negative scale is folded into its byte (bitwise NOT
flips every +-1 of the group); the scale becomes its float32 exponent field |code| + 63 (0 = no
term, which shifted into place is +0.0: no decode branch). K is padded to whole words of groups
with zero scales. Needs one power-of-two term per scale and groups that are whole bytes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from effc.kernels._layout import call_rows, dtype_misfit, fold_signs, rows_of_x, table_entry
from effc.kernels._layout import misfit as layout_misfit
from effc.kernels._standalone import StandaloneKernel, host_target
from effc.ops.registry import Kernel, TargetKernels

LANES = 16  # float32 lanes of a zmm register: output rows per vector, entries per table
BLOCK = 4   # vectors of output rows per parallel task (accumulators kept in registers)
WORD = 4    # bytes (of bits, or exponent fields) per 32-bit lane
PERMUTE = "llvm.x86.avx512.permvar.sf.512"


@dataclass(frozen=True)
class Packed:
    """The kernel's weight layout (see the module docstring)."""

    bits: np.ndarray  # uint32 [N/R, q, K_pad/32, R]: bytes 4w..4w+3 of a row in one word
    exps: np.ndarray  # uint32 [N/R, q, K_pad/(4g), R]: exponent fields of groups 4w..4w+3
    group: int
    k: int  # K before padding

    @property
    def shape(self) -> tuple[int, int, int]:
        blocks, q, _, rows = self.bits.shape
        return q, blocks * rows, self.k


def pack(planes: np.ndarray, codes: np.ndarray, rows: int = LANES * BLOCK) -> Packed:
    """Op layout (planes uint8 [q, N, K/8], codes int8 [q, N, K/g, 1]) -> kernel layout, in
    blocks of ``rows`` output rows (one parallel task), each block one contiguous stream."""
    q, n, kb = planes.shape
    if n % rows:
        raise ValueError(f"N={n} is not a multiple of the kernel's {rows}-row blocks")
    bits, exps, group = fold_signs(planes, codes)
    groups = exps.shape[2]
    pad = -groups % WORD  # zero scales: the padded bytes add 0 x (a finite table entry)
    bits = np.pad(bits, ((0, 0), (0, 0), (0, pad * group // 8)))
    exps = np.pad(exps, ((0, 0), (0, 0), (0, pad)))

    def words(a: np.ndarray) -> np.ndarray:  # [q, N, C*4] bytes -> [N/rows, q, C, rows] uint32
        w = np.ascontiguousarray(a).view("<u4")
        return np.ascontiguousarray(w.reshape(q, n // rows, rows, w.shape[2]).transpose(1, 0, 3, 2))

    return Packed(words(bits), words(exps), group, kb * 8)



@functools.cache  # one parse per shape: a model's linears share a handful of shapes
def prim_func(m: int, n: int, k: int, q: int, group: int, block: int = BLOCK):
    """TIR for X [m, k] float32 -> Y [m, n]; ``block`` vectors of 16 output rows per parallel task."""
    from tvm.script import tirx as T

    if n % (LANES * block) or k % group or group % 8:
        raise ValueError(f"shape n={n}, k={k}, group={group} does not fit the kernel's tiling")
    per_group = group // 8  # bytes per group
    words = -(-(k // group) // WORD)  # exponent words along K (groups padded to whole words)
    k_pad = words * WORD * group
    kc, lanes, rows = k_pad // 4, LANES, LANES * block

    @T.prim_func(s_tir=True)
    def shift_add_lut(x: T.Buffer((m, k), "float32"),
                      bits: T.Buffer((n // rows, q, words * per_group, rows), "uint32"),
                      exps: T.Buffer((n // rows, q, words, rows), "uint32"), bias: T.Buffer((n,), "float32"),
                      y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "shift_add_lut", "tirx.noalias": True})
        lut = T.alloc_buffer((m, kc, lanes), "float32")
        # Tables: entry u of chunk c is sum_t (+x if bit t of u else -x) over the chunk's 4 inputs
        # (0 past K: the padding).
        for r in T.parallel(m):
            for c in range(kc):
                for u in T.vectorized(lanes):
                    lut[r, c, u] = table_entry(x, r, c * 4, k, u)
        for nb in T.parallel(n // rows):
            for r in range(m):
                for v in T.unroll(block):
                    y[r, T.Ramp(nb * rows + v * lanes, 1, lanes)] = bias[T.Ramp(nb * rows + v * lanes, 1, lanes)]
                for i, w in T.grid(q, words):
                    for s in T.unroll(WORD):  # group 4w + s
                        for b in T.unroll(per_group):  # byte b of the group: byte j of the row
                            for v in T.unroll(block):
                                col = nb * rows + v * lanes
                                # the group's exponent field is byte s of the word, moved into place
                                field = T.bitwise_and(T.shift_right(exps[nb, i, w, T.Ramp(v * lanes, 1, lanes)],
                                                                    T.Broadcast(T.Cast("uint32", s * 8), lanes)),
                                                      T.Broadcast(T.uint32(0xFF), lanes))
                                scale = T.reinterpret("float32x16",
                                                      T.shift_left(field, T.Broadcast(T.uint32(23), lanes)))
                                jj = s * per_group + b  # byte within the word(s) of this exponent word
                                j = w * WORD * per_group + jj
                                word = bits[nb, i, w * per_group + jj // WORD, T.Ramp(v * lanes, 1, lanes)]
                                index = T.reinterpret("int32x16", T.shift_right(
                                    word, T.Broadcast(T.Cast("uint32", (jj % WORD) * 8), lanes)))
                                # vpermps reads only the low 4 bits of each index: no masking of nibbles
                                lo = T.call_llvm_pure_intrin("float32x16", PERMUTE, lut[r, j * 2, T.Ramp(0, 1, lanes)],
                                                             index)
                                hi = T.call_llvm_pure_intrin("float32x16", PERMUTE,
                                                             lut[r, j * 2 + 1, T.Ramp(0, 1, lanes)],
                                                             T.shift_right(index, T.Broadcast(4, lanes)))
                                y[r, T.Ramp(col, 1, lanes)] = y[r, T.Ramp(col, 1, lanes)] + (lo + hi) * scale

    return shift_add_lut


PREFILL_MIN_ROWS = 16  # from here on re-reading every weight byte per row of X costs more than tables of 8


def misfit(planes_shape: tuple, codes_shape: tuple) -> str | None:
    """Why a weight (planes [q, N, K/8], codes [q, N, K/g, T]) does not fit the kernels at every M,
    or None when it does (checked against the decode kernel, whose constraints include the prefill
    kernel's, so the choice never depends on M)."""
    n = planes_shape[1]
    reason = layout_misfit(planes_shape, codes_shape)
    if reason:
        return reason
    if n % (LANES * BLOCK):
        return f"N={n} is not a multiple of {LANES * BLOCK}"
    return None


def choose(planes: np.ndarray, codes: np.ndarray, m: int) -> Kernel:
    """The kernel for one weight at M rows of X, ``func(x [rows, K], bits, exps, bias, y [rows, N])``
    with X padded from M to rows, and the weight packed for it: m < PREFILL_MIN_ROWS: the decode kernel here (vectorised over output rows); otherwise the
    prefill kernel (shift_add_prefill: vectorised over rows of X, X padded to whole row blocks)."""
    if m < PREFILL_MIN_ROWS:
        packed = pack(planes, codes)
        q, n, k = packed.shape
        name, rows = "shift_add_lut", m
        func = prim_func(m, n, k, q, packed.group)
    else:
        from effc.kernels import shift_add_prefill as prefill

        packed = prefill.pack_prefill(planes, codes)
        q, n, k = packed.shape
        block = prefill.ROWS if m >= prefill.ROWS else prefill.LANES
        name, rows = "shift_add_prefill", -(-m // block) * block
        func = prefill.prim_func_prefill(rows, n, k, q, packed.group, packed.k_block, rows=block)
    symbol = f"{name}_m{rows}_n{n}_k{k}_q{q}_g{packed.group}_"  # TVM may append digits to a kernel name
    return Kernel(name, symbol, func, (packed.bits, packed.exps))


def has_avx512(target) -> bool:
    from effc.codegen.target import vector_bytes

    return vector_bytes(target) >= 64  # the kernels are written for zmm registers (LANES, vpermps)


def fit(node, constants: list, target) -> str | None:
    """Why an effc.ShiftAddMatMul node cannot take these kernels on ``target`` (planes and codes
    given as ``constants``), or None."""
    if not has_avx512(target):
        return "the CPU kernels need AVX-512"
    planes, codes = constants
    return dtype_misfit(node) or misfit(planes.shape, codes.shape)


def build(shapes: list, constants: list) -> Kernel:
    """The kernel for X of ``shapes[0]`` (bias ``shapes[1]``), planes and codes packed for it."""
    return choose(*constants, rows_of_x(shapes))


KERNELS = TargetKernels(fit=fit, build=build, call=call_rows)  # effc.ShiftAddMatMul's registration names it


class ShiftAddKernel(StandaloneKernel):
    """A built kernel for one weight: ``kernel(x)`` -> x @ W^T + bias (x float32 [m, k]); see choose."""

    def __init__(self, planes: np.ndarray, codes: np.ndarray, bias: np.ndarray, m: int, target=None,
                 threads: int | None = None):
        if threads:  # TVM's CPU thread pool reads this when it starts
            os.environ["TVM_NUM_THREADS"] = str(threads)
        super().__init__(choose(planes, codes, m), bias, m, planes.shape[1], target or host_target())
