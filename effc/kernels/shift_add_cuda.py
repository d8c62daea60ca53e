"""CUDA lookup-table kernel for effc.ShiftAddMatMul, hand-written TIR built by TVM.

    Y[m, n] = bias[n] + sum_i sum_j alpha[i, n, j] * (sum_t b[i, n, 8j + t] x[m, 8j + t])

No dense weight is ever rebuilt. A thread block takes one row of X and THREADS output columns
(one per thread). K is walked in chunks of CHUNK weight bytes: the block first builds, in shared
memory, the 16-entry table of signed sums of every 4 activations of the chunk
(``lut[c, u] = sum_t (2 bit_t(u) - 1) x[4c + t]``), then each thread reads its column's bytes
(consecutive threads, consecutive bytes: coalesced), looks both nibbles up, scales the pair by
the group's power of two (the float assembled from the stored exponent field: no multiply to
form it) and accumulates in a register. TVM inserts the barriers around the shared table.

Layout (``pack``): bytes and float32 exponent fields transposed to [q, K/8, N] and [q, K/g, N]
uint8 (N innermost, for coalescing), a negative scale folded into its bytes, K padded to whole
chunks with zero scales. ``prim_func(..., gpu=False)`` builds the same body with serial loops
instead of thread bindings, so the arithmetic is checked on a CPU (no GPU in CI).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from effc.kernels._layout import call_rows, dtype_misfit, fold_signs, rows_of_x, table_entry
from effc.kernels._layout import misfit as layout_misfit
from effc.ops.registry import Kernel, TargetKernels

THREADS = 128  # output columns per thread block
CHUNK = 32     # weight bytes (256 activations) per shared table: 64 tables x 16 floats = 4 KiB
TABLES = CHUNK * 2  # one 16-entry table per 4 activations (a nibble)


@dataclass(frozen=True)
class PackedCuda:
    bits: np.ndarray  # uint8 [q, K_pad/8, N]
    exps: np.ndarray  # uint8 [q, K_pad/g, N]
    group: int
    k: int  # K before padding

    @property
    def shape(self) -> tuple[int, int, int]:
        q, _, n = self.bits.shape
        return q, n, self.k


def misfit(planes_shape: tuple, codes_shape: tuple) -> str | None:
    """Why a weight (planes [q, N, K/8], codes [q, N, K/g, T]) does not fit this kernel, or None."""
    reason = layout_misfit(planes_shape, codes_shape)
    if reason:
        return reason
    group_bytes = planes_shape[2] // codes_shape[2]
    if CHUNK % group_bytes:
        return f"groups of {group_bytes} bytes do not divide the {CHUNK}-byte chunks"
    return None


def pack(planes: np.ndarray, codes: np.ndarray) -> PackedCuda:
    """Op layout (planes uint8 [q, N, K/8], codes int8 [q, N, K/g, 1]) -> kernel layout."""
    bits, exps, group = fold_signs(planes, codes)
    kb = bits.shape[2]
    pad = -kb % CHUNK  # whole chunks; the padded bytes get zero scales (0 x a finite table entry)
    bits = np.pad(bits, ((0, 0), (0, 0), (0, pad)))
    exps = np.pad(exps, ((0, 0), (0, 0), (0, pad // (group // 8))))
    return PackedCuda(np.ascontiguousarray(bits.transpose(0, 2, 1)), np.ascontiguousarray(exps.transpose(0, 2, 1)),
                      group, kb * 8)


@functools.cache  # one parse per shape
def prim_func(m: int, n: int, k: int, q: int, group: int, gpu: bool = True):
    """TIR for X [m, k] float32 -> Y [m, n]. ``gpu=False``: serial loops, for checking on a CPU."""
    from tvm.script import tirx as T

    if k % group or group % 8 or CHUNK % (group // 8):
        raise ValueError(f"shape k={k}, group={group} does not fit the kernel")
    per_group = group // 8
    chunks = -(-(k // 8) // CHUNK)
    kb_pad = chunks * CHUNK
    blocks = -(-n // THREADS)
    builds = TABLES * 16 // THREADS  # table entries each thread builds per chunk
    scope = "shared" if gpu else "global"

    def bind(extent: int, thread: str):
        return T.thread_binding(extent, thread=thread) if gpu else T.serial(extent)

    @T.prim_func(s_tir=True)
    def shift_add_lut_cuda(x: T.Buffer((m, k), "float32"), bits: T.Buffer((q, kb_pad, n), "uint8"),
                           exps: T.Buffer((q, kb_pad // per_group, n), "uint8"), bias: T.Buffer((n,), "float32"),
                           y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "shift_add_lut_cuda", "tirx.noalias": True})
        for row in bind(m, "blockIdx.y"):
            for bx in bind(blocks, "blockIdx.x"):
                lut = T.alloc_buffer((TABLES, 16), "float32", scope=scope)
                for tx in bind(THREADS, "threadIdx.x"):
                    if bx * THREADS + tx < n:
                        y[row, bx * THREADS + tx] = bias[bx * THREADS + tx]
                for c in range(chunks):
                    for tx in bind(THREADS, "threadIdx.x"):
                        for e in range(builds):
                            # entry u of table t: sum over its 4 activations of +-x (0 past K: padding)
                            lut[(e * THREADS + tx) // 16, (e * THREADS + tx) % 16] = table_entry(
                                x, row, (c * TABLES + (e * THREADS + tx) // 16) * 4, k, (e * THREADS + tx) % 16)
                    for tx in bind(THREADS, "threadIdx.x"):
                        if bx * THREADS + tx < n:
                            acc = T.alloc_buffer((1,), "float32", scope="local")
                            acc[0] = T.float32(0)
                            for i, jj in T.grid(q, CHUNK):
                                acc[0] = acc[0] + (
                                    lut[jj * 2, T.Cast("int32", bits[i, c * CHUNK + jj, bx * THREADS + tx]) & 15]
                                    + lut[jj * 2 + 1, T.Cast("int32", bits[i, c * CHUNK + jj, bx * THREADS + tx]) >> 4]
                                ) * T.reinterpret("float32", T.shift_left(T.Cast(
                                    "int32", exps[i, (c * CHUNK + jj) // per_group, bx * THREADS + tx]), 23))
                            y[row, bx * THREADS + tx] = y[row, bx * THREADS + tx] + acc[0]

    return shift_add_lut_cuda


def choose(planes: np.ndarray, codes: np.ndarray, m: int) -> Kernel:
    """The kernel for one weight at M rows of X (no padding of X), and the weight packed for it."""
    packed = pack(planes, codes)
    q, n, k = packed.shape
    symbol = f"shift_add_lut_cuda_m{m}_n{n}_k{k}_q{q}_g{packed.group}_"
    return Kernel("shift_add_lut_cuda", symbol, prim_func(m, n, k, q, packed.group), (packed.bits, packed.exps))


def fit(node, constants: list, target) -> str | None:
    """Why an effc.ShiftAddMatMul node cannot take this kernel (planes and codes given as ``constants``), or None."""
    planes, codes = constants
    return dtype_misfit(node) or misfit(planes.shape, codes.shape)


def build(shapes: list, constants: list) -> Kernel:
    """The kernel for X of ``shapes[0]`` (bias ``shapes[1]``), planes and codes packed for it."""
    return choose(*constants, rows_of_x(shapes))


KERNELS = TargetKernels(fit=fit, build=build, call=call_rows)  # effc.ShiftAddMatMul's registration names it
