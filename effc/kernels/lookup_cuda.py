"""CUDA kernel for effc.LookupLinear, hand-written TIR built by TVM.

    Y[m, :] = bias + sum_c s[c] * w_c(x_m) * float(tables[c, code_c(x_m), :])

A thread block takes ROWS rows of X and THREADS output columns (one per thread). It first encodes
its rows (each thread some of the ROWS x C (row, chunk) pairs: nearest centroid or sign bits, the
same TIR as the CPU kernels) into shared memory: codes, and scale x soft weight. Then it walks the
chunks in stages of ``stage`` chunks: the stage's tables for the block's columns are copied into
shared memory (consecutive threads, consecutive columns: coalesced), and each thread looks its
column's entries up for all ROWS rows and accumulates. A table row is read from global memory
once per block instead of once per row. TVM inserts the barriers around the shared buffers.

Layout (``pack``): tables [C, k, N_pad], N padded to whole blocks of columns with zeros.
``prim_func(..., gpu=False)`` builds the same body with serial loops instead of thread bindings,
so the arithmetic is checked on a CPU (no GPU in CI).
"""

from __future__ import annotations

import functools

import numpy as np

from effc.errors import EffcError
from effc.kernels._layout import call_rows, rows_of_x
from effc.kernels.lookup_cpu import Layer, encoder_macro, io_misfit, layer
from effc.ops.registry import Kernel, TargetKernels

THREADS = 128        # output columns per thread block
ROWS = 8             # rows of X per thread block (accumulators per thread)
STAGE_BYTES = 16384  # shared memory for one stage of tables (48 KiB is the portable limit)


def stage_chunks(k: int, itemsize: int) -> int:
    """Chunks whose tables for THREADS columns fit one stage (0: not even one)."""
    return STAGE_BYTES // (k * THREADS * itemsize)


def misfit(lay: Layer) -> str | None:
    if stage_chunks(lay.codes, lay.tables.itemsize) == 0:
        return (f"one chunk's tables for {THREADS} columns ({lay.codes} x {THREADS} x {lay.tables.itemsize} bytes) "
                f"exceed the {STAGE_BYTES}-byte shared stage")
    return None


def pack(tables: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.pad(tables, ((0, 0), (0, 0), (0, -tables.shape[2] % THREADS))))


@functools.cache  # one parse per shape
def prim_func(m: int, n: int, c_count: int, k: int, v: int, encoder: str, soft: bool, table_dtype: str,
              gpu: bool = True):
    """TIR for X [m, C*v] float32 -> Y [m, n]. ``gpu=False``: serial loops, for checking on a CPU."""
    from tvm.script import tirx as T

    stage = min(c_count, stage_chunks(k, np.dtype(table_dtype).itemsize))
    if stage == 0:
        raise ValueError(f"k={k} {table_dtype} tables do not fit a shared stage")
    n_pad, kk = -(-n // THREADS) * THREADS, c_count * v
    stages, pairs = -(-c_count // stage), -(-ROWS * c_count // THREADS)
    enc_shape = (c_count, v, k) if encoder == "pq" else (c_count, v)
    scope = "shared" if gpu else "global"
    encode = encoder_macro(T, encoder, soft, k, v, vectorize=False)

    def bind(extent: int, thread: str):
        return T.thread_binding(extent, thread=thread) if gpu else T.serial(extent)

    @T.prim_func(s_tir=True)
    def lookup_cuda(x: T.Buffer((m, kk), "float32"), enc: T.Buffer(enc_shape, "float32"),
                    tab: T.Buffer((c_count, k, n_pad), table_dtype), scale: T.Buffer((c_count,), "float32"),
                    bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "lookup_cuda", "tirx.noalias": True})
        for by in bind(-(-m // ROWS), "blockIdx.y"):
            for bx in bind(n_pad // THREADS, "blockIdx.x"):
                codes = T.alloc_buffer((ROWS, c_count), "int32", scope=scope)
                weight = T.alloc_buffer((ROWS, c_count), "float32", scope=scope)
                table = T.alloc_buffer((stage, k, THREADS), table_dtype, scope=scope)
                for tx in bind(THREADS, "threadIdx.x"):
                    for e in range(pairs):  # pair p = e * THREADS + tx: row p // C of the block, chunk p % C
                        if e * THREADS + tx < ROWS * c_count and by * ROWS + (e * THREADS + tx) // c_count < m:
                            code = T.alloc_buffer((1,), "int32", scope="local")
                            soft_w = T.alloc_buffer((1,), "float32", scope="local")
                            encode(x, enc, by * ROWS + (e * THREADS + tx) // c_count, (e * THREADS + tx) % c_count,
                                   code, soft_w)
                            codes[(e * THREADS + tx) // c_count, (e * THREADS + tx) % c_count] = code[0]
                            weight[(e * THREADS + tx) // c_count, (e * THREADS + tx) % c_count] = \
                                scale[(e * THREADS + tx) % c_count] * soft_w[0]
                    for r in range(ROWS):
                        if by * ROWS + r < m and bx * THREADS + tx < n:
                            y[by * ROWS + r, bx * THREADS + tx] = bias[bx * THREADS + tx]
                for s in range(stages):
                    for tx in bind(THREADS, "threadIdx.x"):
                        for cc, j in T.grid(stage, k):
                            if s * stage + cc < c_count:
                                table[cc, j, tx] = tab[s * stage + cc, j, bx * THREADS + tx]
                    for tx in bind(THREADS, "threadIdx.x"):
                        if bx * THREADS + tx < n:
                            for r in range(ROWS):
                                if by * ROWS + r < m:
                                    acc = T.alloc_buffer((1,), "float32", scope="local")
                                    acc[0] = T.float32(0)
                                    for cc in range(stage):
                                        if s * stage + cc < c_count:
                                            acc[0] = acc[0] + weight[r, s * stage + cc] * T.Cast(
                                                "float32", table[cc, codes[r, s * stage + cc], tx])
                                    y[by * ROWS + r, bx * THREADS + tx] = y[by * ROWS + r, bx * THREADS + tx] + acc[0]

    return lookup_cuda


def choose(lay: Layer, m: int, gpu: bool = True) -> Kernel:
    c_count, k, v, n = lay.chunks, lay.codes, lay.v, lay.n
    dtype = str(lay.tables.dtype)
    func = prim_func(m, n, c_count, k, v, lay.encoder, lay.soft, dtype, gpu)
    symbol = f"lookup_cuda_m{m}_n{n}_c{c_count}_k{k}_v{v}_{lay.encoder}{'_soft' if lay.soft else ''}_{dtype}_"
    return Kernel("lookup_cuda", symbol, func, (lay.encoder_layout(), pack(lay.tables), lay.scale))


def fit(node, constants: list, target) -> str | None:
    """Why an effc.LookupLinear node cannot take this kernel, or None."""
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    return io_misfit(node) or misfit(layer(constants, attributes))


def build(shapes: list, constants: list, attributes: dict, target) -> Kernel:
    lay = layer(constants, attributes)
    if shapes[0][-1] != lay.chunks * lay.v:
        raise EffcError(f"X has K={shapes[0][-1]}, the tables {lay.chunks} chunks of {lay.v}")
    return choose(lay, rows_of_x(shapes))


KERNELS = TargetKernels(fit=fit, build=build, call=call_rows, context=True)  # effc.LookupLinear's registration
