"""Softmax over the last axis as a hand-written kernel (TVM's fast_softmax, rows of any length).

The generic row-reduction rule vectorises a row only when its length is a multiple of the vector
lanes (16 float32 on AVX-512, 8 on AVX2): TVM 0.27 vectorises a bounded (masked) access only when
every access in the loop shares the bound's index, and its rfactor drops the bound of a ragged
split, so ViT's 197-token rows ran scalar, polynomial exp included. Here each row is written out directly: whole vector chunks as vectors, the ragged
tail (less than a vector) as scalars, rows in parallel.

    y[r, :] = e / sum(e),   e = exp(x[r, :] - max(x[r, :]))

Under --precision bf16 the softmax feeding attention's second matmul ends in a cast to bf16 (the
matmul's operand, effc.codegen.bf16_matmul); that kernel is taken too: e goes to a row of fp32
scratch and the normalised row is written as bf16 once, so the cast costs no pass of its own.

exp is a range reduction to 2^k * exp(f), |f| <= ln2/2, with a degree-6 polynomial for exp(f) and
2^k assembled in the exponent bits: no libm call (those are scalar, ~100x a multiply).
"""

from __future__ import annotations

from effc.codegen.schedules.cpu.base import CPURule, vector_lanes

STAGES = ("T_softmax_maxelem", "T_softmax_delta", "T_fast_exp", "T_softmax_expsum", "T_softmax_norm")
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
EXP_LOW = -87.0  # below this exp underflows float32's normal range; x - max <= 0, so no upper clamp
# exp of anything below EXP_LOW is flushed to exactly 0 (GPT-2's causal mask adds -3.4e38): left at
# e^-87 ~ 1.6e-38, the masked probabilities times V make denormal products, and x86 takes a
# microcode assist per denormal (the attention matmul after the softmax ran ~50x slower).
# Taylor-like coefficients of exp(f) on |f| <= ln2/2 (Cephes' expf minimax fit), highest power first.
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


class Softmax(CPURule):
    name = "softmax"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        lanes = vector_lanes("float32", target)
        shape = _softmax_shape(func, lanes)
        if shape is None:
            return None
        from tvm import s_tir

        rows, n = shape
        out_dtype = str(func.params[1].dtype)
        return s_tir.Schedule(softmax_kernel(list(func.params[0].shape), rows, n, lanes, out_dtype))


def _softmax_shape(func, lanes: int) -> tuple[int, int] | None:
    """(rows, row length) when ``func`` is exactly TVM's float32 fast_softmax over the last axis,
    its output float32 or cast to bfloat16, and a row holds at least one vector of ``lanes``."""
    from tvm import tirx

    if len(func.params) != 2:
        return None
    src, dst = func.params
    if str(src.dtype) != "float32" or str(dst.dtype) not in ("float32", "bfloat16"):
        return None
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in src.shape]
    if None in dims or [int(d) for d in dst.shape] != dims or len(dims) < 1:
        return None
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    sch = s_tir.Schedule(func)
    stages = STAGES if str(dst.dtype) == "float32" else (*STAGES, "compute")  # the cast to bf16
    blocks = sch.get_child_blocks(get_root_block(sch))
    if tuple(sch.get(b).name_hint for b in blocks) != stages:
        return None
    if len(stages) > len(STAGES):  # "compute" names many elementwise ops: it must be the plain cast
        body = sch.get(blocks[-1]).body
        value = getattr(body, "value", None)
        loads = ("TensorLoad", "BufferLoad")  # tirx.BufferLoad is a constructor; TVM builds a TensorLoad
        if not (isinstance(value, tirx.Cast) and type(value.value).__name__ in loads):
            return None
    n = dims[-1]
    rows = 1
    for d in dims[:-1]:
        rows *= d
    return (rows, n) if n >= lanes else None


def _exp(v, lanes: int = 1):
    """exp of a float32 value, or vector of ``lanes`` (every element <= 0), without libm:
    2^k * p(f), k = round(v log2 e), 2^k assembled in the exponent bits; 0 below EXP_LOW."""
    from tvm.script import tirx as T

    def const(value, dtype="float32"):
        scalar = T.float32(value) if dtype == "float32" else T.int32(value)
        return T.Broadcast(scalar, lanes) if lanes > 1 else scalar

    suffix = f"x{lanes}" if lanes > 1 else ""
    x = T.max(v, const(EXP_LOW))
    k = T.floor(x * const(LOG2E) + const(0.5))
    f = x - k * const(LN2)
    p = const(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * f + const(c)
    p = p * f * f + f + const(1.0)
    biased = T.Cast(f"int32{suffix}", k) + const(127, "int32")
    two_k = T.reinterpret(f"float32{suffix}", T.shift_left(biased, const(23, "int32")))
    return T.Select(v < const(EXP_LOW), const(0.0), p * two_k)


def softmax_kernel(shape: list, rows: int, n: int, lanes: int = 16, out_dtype: str = "float32"):
    """TIR for softmax over the last axis of a float32 tensor of ``shape`` (rows x n when flat),
    in vectors of ``lanes`` (a SIMD register of the target: 16 with AVX-512, 8 with AVX2), written
    as ``out_dtype`` (float32, or bfloat16: then e is kept in a row of fp32 scratch, not in y).

    The kernel keeps the tensor's own rank (the VM checks it) and addresses row r through its
    leading indices; no flat view is declared, as TVM's schedule state (built for every kernel by
    later Relax passes) cannot see blocks under a buffer declaration."""
    from tvm import tirx
    from tvm.script import tirx as T

    full, tail = n // lanes, n % lanes
    lead = [int(d) for d in shape[:-1]]

    def at(row, col) -> list:  # N-d index of element col of flat row ``row``
        index, stride = [], 1
        for d in reversed(lead):
            index.append(tirx.floormod(tirx.floordiv(row, stride), d) if stride > 1 else tirx.floormod(row, d))
            stride *= d
        return [*reversed(index), col]

    def chunk(start):
        return T.Ramp(start, 1, lanes)

    def load(buf, row, col):
        return tirx.BufferLoad(buf, at(row, col))

    scratch = out_dtype != "float32"  # e in a row of fp32 scratch, not in y

    def e_index(y, e_row, row, col, width):
        if scratch:
            return e_row, [T.Ramp(row * n + col, 1, width) if width > 1 else row * n + col]
        return y, at(row, chunk(col) if width > 1 else col)

    def put_e(y, e_row, row, col, width, value):
        buf, index = e_index(y, e_row, row, col, width)
        T.buffer_store(buf, value, index)

    def get_e(y, e_row, row, col, width):
        buf, index = e_index(y, e_row, row, col, width)
        return tirx.BufferLoad(buf, index)

    def as_out(value, width):
        return T.Cast(f"{out_dtype}x{width}" if width > 1 else out_dtype, value) if scratch else value

    @T.prim_func(s_tir=True)
    def softmax(x_in: T.handle, y_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_in, shape, "float32")
        y = T.match_buffer(y_out, shape, out_dtype)
        for r in T.parallel(rows):
            with T.sblock("row"):
                v = T.axis.spatial(rows, r)
                T.reads()  # opaque: the scratch below lives in the block
                T.writes()
                # Row v's scratch: the lane partials at v * lanes and one statistic at v. Declared in
                # the row block, TVM compacts each to the one row and puts it on the stack (at
                # function level the Relax passes reject the kernel; in "local" scope every row
                # costs a workspace call).
                acc = T.alloc_buffer((rows * lanes,), "float32")
                stat = T.alloc_buffer((rows,), "float32")
                e_row = T.alloc_buffer((rows * n if scratch else 1,), "float32")  # bf16 output only
                # max: lane-wise over whole chunks, then across the lanes and the tail
                acc[chunk(v * lanes)] = load(x, v, chunk(0))
                for c in range(1, full):
                    acc[chunk(v * lanes)] = T.max(acc[chunk(v * lanes)], load(x, v, chunk(c * lanes)))
                stat[v] = acc[v * lanes]
                for u in range(1, lanes):
                    stat[v] = T.max(stat[v], acc[v * lanes + u])
                for t in range(tail):
                    stat[v] = T.max(stat[v], load(x, v, full * lanes + t))
                # e = exp(x - max) into y (or the scratch), summed lane-wise
                acc[chunk(v * lanes)] = T.Broadcast(T.float32(0), lanes)
                for c in range(full):
                    put_e(y, e_row, v, c * lanes, lanes,
                          _exp(load(x, v, chunk(c * lanes)) - T.Broadcast(stat[v], lanes), lanes))
                    acc[chunk(v * lanes)] = acc[chunk(v * lanes)] + get_e(y, e_row, v, c * lanes, lanes)
                for t in range(tail):
                    put_e(y, e_row, v, full * lanes + t, 1, _exp(load(x, v, full * lanes + t) - stat[v]))
                    acc[v * lanes] = acc[v * lanes] + get_e(y, e_row, v, full * lanes + t, 1)
                stat[v] = acc[v * lanes]
                for u in range(1, lanes):
                    stat[v] = stat[v] + acc[v * lanes + u]
                # normalise by one reciprocal per row
                stat[v] = T.float32(1) / stat[v]
                for c in range(full):
                    T.buffer_store(y, as_out(get_e(y, e_row, v, c * lanes, lanes) * T.Broadcast(stat[v], lanes), lanes),
                                   at(v, chunk(c * lanes)))
                for t in range(tail):
                    T.buffer_store(y, as_out(get_e(y, e_row, v, full * lanes + t, 1) * stat[v], 1),
                                   at(v, full * lanes + t))

    return softmax
