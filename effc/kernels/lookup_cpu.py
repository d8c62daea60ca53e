"""CPU kernels for effc.LookupLinear, hand-written TIR built by TVM.

    Y[m, :] = bias + sum_c s[c] * w_c(x_m) * float(tables[c, code_c(x_m), :])

Both kernels first encode every row (phase 1: the nearest of k centroids of each v-dim chunk,
vectorised over the centroids, or the chunk's sign bits against its centres, with MemoryFormer's
soft weight where asked), then look the codes up and accumulate (phase 2), in one PrimFunc; the
dense weight is never rebuilt. Distances are summed in float32 in the order of the chunk's dims, so
a code differs from the op's reference only where two centroids are within float32 rounding.

- ``lookup_shuffle`` (AVX-512BW, k = 16, int8 tables, M >= 16): the 16-entry int8 tables of one
  chunk for 4 output columns fill one zmm register (one 16-byte lane a column: the Bolt/MADDNESS
  layout), and the index of ``vpshufb`` holds the codes of 4 rows, each in the top byte of a 32-bit
  lane with the bytes below it zeroed (index -128), repeated in every column's lane. One shuffle so
  gives entry x 2^24 as an exact int32 (sign included, no extract or sign extension) for 4 rows x 4
  columns; it converts to float exactly and one FMA multiplies it by the chunk's scale x 2^-24
  (times the rows' soft weights) into float accumulators. The scale is per table, so chunks cannot
  share an integer accumulator without changing the op's arithmetic: per 64 lookups, 4 shuffles, 4
  conversions, 4 FMAs. Parallel over blocks of 16 output columns; each task holds 16 rows x 16
  columns of accumulators in registers.
- ``lookup_plain`` (any CPU, any k, int8 or float tables, and every M < 16 on AVX-512 as well):
  each row reads its chunk's table row straight from memory, vectorised over 64 output columns:
  at M = 1 a shuffle would use 1 of its 16 rows, while this reads only the C rows of the table it
  needs. Parallel over blocks of output columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from effc.errors import EffcError
from effc.kernels._layout import call_rows, rows_of_x
from effc.kernels._standalone import StandaloneKernel, host_target
from effc.ops.registry import Kernel, TargetKernels

SHUFFLE = "llvm.x86.avx512.pshuf.b.512"
ROWS = 16         # rows of X per task and row block (4 shuffles of 4 rows)
COLS = 4          # output columns per shuffle (the 16-byte lanes of a zmm register)
GROUP = 4         # rows per shuffle (one 32-bit lane each in every column's lane)
BLOCK = 4         # shuffles per chunk and group of rows in one task: 16 columns (16 float32x16 accumulators)
PLAIN_COLS = 64   # output columns per task of the plain kernel (one vector loop)
SHUFFLE_MIN_ROWS = 16  # below this a shuffle would look up mostly padding rows


@dataclass(frozen=True)
class Layer:
    """A LookupLinear's constants and attributes, checked and normalised for the kernels."""

    encoder: str  # "pq" | "hash"
    soft: bool
    encoder_const: np.ndarray  # pq: centroids [C, k, v]; hash: centres [C, v]
    tables: np.ndarray  # int8 or float32 [C, k, N]
    scale: np.ndarray  # float32 [C]

    @property
    def chunks(self) -> int:
        return self.tables.shape[0]

    @property
    def codes(self) -> int:
        return self.tables.shape[1]

    @property
    def v(self) -> int:
        return self.encoder_const.shape[-1]

    @property
    def n(self) -> int:
        return self.tables.shape[2]

    def encoder_layout(self) -> np.ndarray:
        """pq: centroids transposed to [C, v, k] (k innermost: distances vectorised over codes); hash: [C, v]."""
        const = np.asarray(self.encoder_const, np.float32)
        return np.ascontiguousarray(const.transpose(0, 2, 1) if self.encoder == "pq" else const)


def layer(constants: list, attributes: dict | None = None) -> Layer:
    """The Layer of a node's packed inputs (encoder_const, tables, table_scale); the encoder is the
    ``encoder`` attribute, else read from the rank of encoder_const (3: pq, 2: hash)."""
    attributes = attributes or {}
    const, tables, scale = constants
    encoder = attributes.get("encoder") or ("pq" if const.ndim == 3 else "hash")
    return Layer(encoder, bool(attributes.get("soft", 0)) and encoder == "hash", const, tables,
                 np.asarray(scale, np.float32))


def shuffle_misfit(lay: Layer, target) -> str | None:
    """Why the layer cannot take the shuffle kernel on ``target``, or None."""
    from tvm.target.codegen import target_has_features

    if not target_has_features("avx512bw", target):
        return "no AVX-512BW"
    if lay.codes != 16:
        return f"k={lay.codes} (the shuffle kernel takes 16)"
    if lay.tables.dtype != np.int8:
        return "float tables (the shuffle kernel takes int8)"
    if np.any((lay.scale != 0) & (np.abs(lay.scale) < 2.0 ** -100)):  # x 2^-24 would leave float32's normals
        return "table scales below 2^-100"
    return None


def pack_shuffle(tables: np.ndarray) -> np.ndarray:
    """int8 [C, k=16, N] -> [N_pad/16, C, BLOCK, 64]: byte 16L + j of shuffle b is entry j of column
    16t + 4b + L (N padded with zero columns)."""
    c_count, k, n = tables.shape
    cols = COLS * BLOCK
    padded = np.pad(tables, ((0, 0), (0, 0), (0, -n % cols)))
    blocks = padded.shape[2] // cols
    t = padded.reshape(c_count, k, blocks, BLOCK, COLS).transpose(2, 0, 3, 4, 1)  # [t, c, b, L, j]
    return np.ascontiguousarray(t.reshape(blocks, c_count, BLOCK, COLS * k))


def pack_plain(tables: np.ndarray) -> np.ndarray:
    """[C, k, N] -> [N_pad/64, C, k, 64] (one task's columns contiguous; N padded with zero columns)."""
    c_count, k, n = tables.shape
    padded = np.pad(tables, ((0, 0), (0, 0), (0, -n % PLAIN_COLS)))
    t = padded.reshape(c_count, k, -1, PLAIN_COLS).transpose(2, 0, 1, 3)
    return np.ascontiguousarray(t)


@functools.cache  # one parse per shape: a model's linears share a handful of shapes
def prim_func_shuffle(m: int, n: int, c_count: int, v: int, encoder: str, soft: bool):
    """TIR for X [m, C*v] float32 -> Y [m, n]; m a multiple of 16 (callers pad X), k = 16, int8 tables."""
    from tvm.script import tirx as T

    if m % ROWS:
        raise ValueError(f"m={m} is not a multiple of {ROWS}")
    k, cols, lanes = 16, COLS * BLOCK, COLS * GROUP  # lanes: float32 lanes of one result (4 columns x 4 rows)
    blocks, kk, groups = -(-n // cols), c_count * v, ROWS // GROUP
    pq = encoder == "pq"
    enc_shape = (c_count, v, k) if pq else (c_count, v)
    encode = encoder_macro(T, encoder, soft, k, v)

    @T.prim_func(s_tir=True)
    def lookup_shuffle(x: T.Buffer((m, kk), "float32"), enc: T.Buffer(enc_shape, "float32"),
                       tab: T.Buffer((blocks, c_count, BLOCK, COLS * k), "int8"),
                       scale: T.Buffer((c_count,), "float32"), bias: T.Buffer((n,), "float32"),
                       y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "lookup_shuffle", "tirx.noalias": True})
        # per chunk, 16-row block and group of 4 rows: the shuffle's index (each row's code in the top
        # byte of a 32-bit lane, -128 = "zero this byte" below it, repeated in the 4 column lanes) and
        # the weights 2^-24 x scale x soft weight of the same lanes
        codes = T.alloc_buffer((c_count, m // ROWS, groups, COLS * k), "int8")
        weight = T.alloc_buffer((c_count, m // ROWS, groups, lanes), "float32")
        for r in T.parallel(m):
            for c in range(c_count):
                code = T.alloc_buffer((1,), "int32", scope="local")
                soft_w = T.alloc_buffer((1,), "float32", scope="local")
                encode(x, enc, r, c, code, soft_w)
                for lane in T.unroll(COLS):
                    for byte in T.unroll(3):
                        codes[c, r // ROWS, r % ROWS // GROUP, lane * k + r % GROUP * 4 + byte] = T.int8(-128)
                    codes[c, r // ROWS, r % ROWS // GROUP, lane * k + r % GROUP * 4 + 3] = T.Cast("int8", code[0])
                    weight[c, r // ROWS, r % ROWS // GROUP, lane * GROUP + r % GROUP] = \
                        scale[c] * soft_w[0] * T.float32(2.0 ** -24)
        for t in T.parallel(blocks):
            for rb in range(m // ROWS):
                acc = T.alloc_buffer((BLOCK, groups, lanes), "float32", scope="local")
                for b, g in T.grid(BLOCK, groups):
                    acc[b, g, T.Ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                for c in range(c_count):
                    for b in T.unroll(BLOCK):
                        for g in T.unroll(groups):
                            # one vpshufb: the entries of 4 rows in 4 columns' tables, each in the top byte
                            # of an int32 lane, so the int32 is entry x 2^24 (sign-extended for free) and
                            # converts to float exactly; the 2^-24 is in the weight
                            acc[b, g, T.Ramp(0, 1, lanes)] = acc[b, g, T.Ramp(0, 1, lanes)] + T.Cast(
                                "float32x16", T.reinterpret("int32x16", T.call_llvm_pure_intrin(
                                    "int8x64", SHUFFLE, tab[t, c, b, T.Ramp(0, 1, COLS * k)],
                                    codes[c, rb, g, T.Ramp(0, 1, COLS * k)]))) * weight[c, rb, g, T.Ramp(0, 1, lanes)]
                for b, g in T.grid(BLOCK, groups):
                    for lane in T.unroll(COLS):
                        if t * cols + b * COLS + lane < n:
                            for i in T.unroll(GROUP):
                                y[rb * ROWS + g * GROUP + i, t * cols + b * COLS + lane] = \
                                    acc[b, g, lane * GROUP + i] + bias[t * cols + b * COLS + lane]

    return lookup_shuffle


def encoder_macro(T, encoder: str, soft: bool, k: int, v: int, vectorize: bool = True):
    """A TIR macro encoding chunk c of row r: ``code[0]`` (int32) and ``soft_w[0]`` (the soft weight,
    else 1); ``vectorize``: distances to the k centroids as one vector (CPU), else a serial loop (GPU)."""
    over_codes = T.vectorized if vectorize else T.serial
    if encoder == "pq":
        @T.macro
        def nearest(x, enc, r, c, code, soft_w):
            dist = T.alloc_buffer((k,), "float32", scope="local")
            best = T.alloc_buffer((1,), "float32", scope="local")
            for j in over_codes(k):
                dist[j] = T.float32(0)
            for i in range(v):
                for j in over_codes(k):
                    dist[j] = dist[j] + (x[r, c * v + i] - enc[c, i, j]) * (x[r, c * v + i] - enc[c, i, j])
            code[0] = 0
            best[0] = dist[0]
            for j in range(1, k):  # selects, not branches; strict <: the first index wins a tie
                code[0] = T.Select(dist[j] < best[0], j, code[0])
                best[0] = T.Select(dist[j] < best[0], dist[j], best[0])
            soft_w[0] = T.float32(1)

        return nearest

    @T.macro
    def signs(x, enc, r, c, code, soft_w):
        code[0] = 0
        soft_w[0] = T.float32(1)
        for i in range(v):
            if x[r, c * v + i] - enc[c, i] > T.float32(0):
                code[0] = code[0] + (1 << i)
            if soft:
                soft_w[0] = soft_w[0] * T.sigmoid(T.float32(2) * T.fabs(x[r, c * v + i] - enc[c, i]))

    return signs


@functools.cache
def prim_func_plain(m: int, n: int, c_count: int, k: int, v: int, encoder: str, soft: bool, table_dtype: str):
    """TIR for X [m, C*v] float32 -> Y [m, n], any k and table dtype, no target features."""
    from tvm.script import tirx as T

    blocks, kk, cols = -(-n // PLAIN_COLS), c_count * v, PLAIN_COLS
    pq = encoder == "pq"
    enc_shape = (c_count, v, k) if pq else (c_count, v)
    encode = encoder_macro(T, encoder, soft, k, v)

    @T.prim_func(s_tir=True)
    def lookup_plain(x: T.Buffer((m, kk), "float32"), enc: T.Buffer(enc_shape, "float32"),
                     tab: T.Buffer((blocks, c_count, k, cols), table_dtype),
                     scale: T.Buffer((c_count,), "float32"), bias: T.Buffer((n,), "float32"),
                     y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "lookup_plain", "tirx.noalias": True})
        codes = T.alloc_buffer((m, c_count), "int32")
        weight = T.alloc_buffer((m, c_count), "float32")
        for r in T.parallel(m):
            for c in range(c_count):
                code = T.alloc_buffer((1,), "int32", scope="local")
                soft_w = T.alloc_buffer((1,), "float32", scope="local")
                encode(x, enc, r, c, code, soft_w)
                codes[r, c] = code[0]
                weight[r, c] = scale[c] * soft_w[0]
        for t in T.parallel(blocks):
            for r in range(m):
                acc = T.alloc_buffer((cols,), "float32", scope="local")
                for j in T.vectorized(cols):
                    acc[j] = T.float32(0)
                for c in range(c_count):
                    for j in T.vectorized(cols):
                        acc[j] = acc[j] + T.Cast("float32", tab[t, c, codes[r, c], j]) * weight[r, c]
                for j in range(cols):
                    if t * cols + j < n:
                        y[r, t * cols + j] = acc[j] + bias[t * cols + j]

    return lookup_plain


def choose(lay: Layer, m: int, target) -> Kernel:
    """The kernel for one layer at M rows of X on ``target``, its constants packed for it: the
    shuffle kernel where it fits and M >= 16 (X padded to whole 16-row blocks), else the plain one."""
    c_count, k, v, n = lay.chunks, lay.codes, lay.v, lay.n
    enc = lay.encoder_layout()
    tag = f"n{n}_c{c_count}_k{k}_v{v}_{lay.encoder}{'_soft' if lay.soft else ''}"
    if m >= SHUFFLE_MIN_ROWS and shuffle_misfit(lay, target) is None:
        rows = -(-m // ROWS) * ROWS
        func = prim_func_shuffle(rows, n, c_count, v, lay.encoder, lay.soft)
        return Kernel("lookup_shuffle", f"lookup_shuffle_m{rows}_{tag}_", func,
                      (enc, pack_shuffle(lay.tables), lay.scale))
    dtype = str(lay.tables.dtype)
    func = prim_func_plain(m, n, c_count, k, v, lay.encoder, lay.soft, dtype)
    return Kernel("lookup_plain", f"lookup_plain_m{m}_{tag}_{dtype}_", func, (enc, pack_plain(lay.tables), lay.scale))


def io_misfit(node) -> str | None:
    """Why a node's X and bias do not suit the kernels (they take float32), or None."""
    import onnx_ir as ir

    x, bias = node.inputs[0], node.inputs[4]
    if any(value.dtype not in (None, ir.DataType.FLOAT) for value in (x, bias)):
        return f"kernels take float32 X and bias (got {x.dtype}, {bias.dtype})"
    return None


def fit(node, constants: list, target) -> str | None:
    """Why an effc.LookupLinear node cannot take these kernels, or None (the plain kernel takes
    every layout the op allows; which kernel runs is chosen by shape and target in :func:`build`)."""
    return io_misfit(node)


def build(shapes: list, constants: list, attributes: dict, target) -> Kernel:
    """The kernel for X of ``shapes[0]`` (bias ``shapes[1]``) on ``target``, constants packed for it."""
    lay = layer(constants, attributes)
    if shapes[0][-1] != lay.chunks * lay.v:
        raise EffcError(f"X has K={shapes[0][-1]}, the tables {lay.chunks} chunks of {lay.v}")
    return choose(lay, rows_of_x(shapes), target)


KERNELS = TargetKernels(fit=fit, build=build, call=call_rows, context=True)  # effc.LookupLinear's registration


class LookupKernel(StandaloneKernel):
    """A built kernel for one layer: ``kernel(x)`` -> Y (x float32 [m, K]); see :func:`choose`."""

    def __init__(self, lay: Layer, bias: np.ndarray, m: int, target=None):
        target = target or host_target()
        super().__init__(choose(lay, m, target), bias, m, lay.n, target)
