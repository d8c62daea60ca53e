"""Softmax over the last axis as a hand-written kernel (TVM's fast_softmax, rows of any length).

The generic row-reduction rule vectorises a row only when its length is a multiple of the vector
lanes (16 float32 on AVX-512, 8 on AVX2): TVM 0.27 vectorises a bounded (masked) access only when
every access in the loop shares the bound's index, and its rfactor drops the bound of a ragged
split, so ViT's 197-token rows ran scalar, polynomial exp included. Here each row is written out directly, rows
in parallel, in whole vectors: a ragged tail (less than a vector) is covered by the row's last whole
vector, x[n - lanes : n], which overlaps the chunk before it. The overlap is harmless where it is
recomputed (max is idempotent; exp and the normalised value of an element come out the same) and
masked out of the sum. (Scalar, the tail's 5 elements of a 197-wide row had cost a third of the row.)

    y[r, :] = e / sum(e),   e = exp(x[r, :] - max(x[r, :]))

exp is a range reduction to 2^k * exp(f), |f| <= ln2/2, with a degree-6 polynomial for exp(f) and
2^k assembled in the exponent bits: no libm call (those are scalar, ~100x a multiply).

Elementwise stages FuseOps put after the softmax (a QDQ model's QuantizeLinear of the
probabilities: round, clip, cast to u8) run in the normalising pass, on vectors, so the quantized
probabilities are written once, by the softmax: e then lives in a one-row float scratch.
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

        rows, n, epilogue = shape
        return s_tir.Schedule(softmax_kernel(list(func.params[0].shape), rows, n, lanes, epilogue,
                                             str(func.params[1].dtype)))


def _softmax_shape(func, lanes: int) -> tuple[int, int, object] | None:
    """(rows, row length, epilogue) when ``func`` is TVM's float32 fast_softmax over the last axis,
    possibly followed by elementwise stages (``epilogue``: a function of the probability, else
    None), and a row holds at least one vector of ``lanes``."""
    from tvm import tirx

    if len(func.params) != 2:
        return None
    src, dst = func.params
    if str(src.dtype) != "float32":
        return None
    dims = [int(d) if isinstance(d, tirx.IntImm) else None for d in src.shape]
    if None in dims or [int(d) for d in dst.shape] != dims or len(dims) < 1:
        return None
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(get_root_block(sch))]
    if tuple(b.name_hint for b in blocks[:len(STAGES)]) != STAGES:
        return None
    epilogue = _elementwise_chain(blocks[len(STAGES) - 1:])
    if epilogue is False or (epilogue is None and str(dst.dtype) != "float32"):
        return None
    n = dims[-1]
    rows = 1
    for d in dims[:-1]:
        rows *= d
    return (rows, n, epilogue) if n >= lanes else None


def _elementwise_chain(blocks):
    """The stages after the normalisation (``blocks[0]``) as one function of its value: None when
    there are none, False when one is not elementwise on its predecessor alone (same indices)."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad

    if len(blocks) == 1:
        return None
    steps = []
    for prev, block in zip(blocks, blocks[1:]):
        store, source = block.body, prev.writes[0].source
        own = [iv.var for iv in block.iter_vars]
        if not isinstance(store, tirx.BufferStore) or block.init is not None or len(block.reads) != 1 \
                or not block.reads[0].source.same_as(source):
            return False
        loads = []

        def visit(node, source=source, loads=loads):
            if isinstance(node, TensorLoad):
                loads.append(node.source.same_as(source) and len(node.indices) == len(own)
                             and all(i.same_as(v) for i, v in zip(node.indices, own)))
            return node

        tvm_ffi.structural_map(store.value, visit)
        if not loads or not all(loads):
            return False
        steps.append((source, store.value))

    def apply(value):
        for source, expr in steps:
            value = tvm_ffi.structural_map(
                expr, lambda node, source=source, value=value: value
                if isinstance(node, TensorLoad) and node.source.same_as(source) else node)
        return value

    return apply


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


def softmax_kernel(shape: list, rows: int, n: int, lanes: int = 16, epilogue=None, out_dtype: str = "float32"):
    """TIR for softmax over the last axis of a float32 tensor of ``shape`` (rows x n when flat),
    in vectors of ``lanes`` (a SIMD register of the target: 16 with AVX-512, 8 with AVX2);
    ``epilogue`` (a function of one probability, see _elementwise_chain) gives the ``out_dtype``
    value written instead of the probability.

    The kernel keeps the tensor's own rank (the VM checks it) and addresses row r through its
    leading indices; no flat view is declared, as TVM's schedule state (built for every kernel by
    later Relax passes) cannot see blocks under a buffer declaration."""
    from tvm import tirx
    from tvm.script import tirx as T

    if epilogue is None and out_dtype != "float32":  # a bare cast of the probability (bf16 for attention's P)
        def epilogue(value):
            return T.Cast(out_dtype, value)

    full, tail = n // lanes, n % lanes
    last = n - lanes  # the row's last whole vector (it covers the tail; n >= lanes)
    has_tail = tail > 0  # a Python bool: TVMScript keeps or drops the branch when parsing
    in_tail = tirx.Ramp(0, 1, lanes) >= tirx.Broadcast(lanes - tail, lanes)  # its lanes past the chunks
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

    def e_of(y, e):  # where the row's e = exp(x - max) lives: y itself, or the scratch
        return e if epilogue is not None else y

    def e_at(v, col) -> list:
        if epilogue is None:
            return at(v, col)
        return [T.Ramp(v * n + col.base, 1, lanes) if isinstance(col, tirx.Ramp) else v * n + col]

    def e_load(y, e, v, col):
        return tirx.BufferLoad(e_of(y, e), e_at(v, col))

    def written(value):
        return epilogue(value) if epilogue is not None else value

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
                # Row v's scratch: the lane partials at v * lanes and one statistic at v (and with an
                # epilogue e, at v * n). Declared in the row block, TVM compacts each to the one row
                # and puts it on the stack (at function level the Relax passes reject the kernel; in
                # "local" scope every row costs a workspace call).
                acc = T.alloc_buffer((rows * lanes,), "float32")
                stat = T.alloc_buffer((rows,), "float32")
                e = T.alloc_buffer((rows * n if epilogue is not None else 1,), "float32")
                # max: lane-wise over whole chunks and the last vector, then across the lanes
                acc[chunk(v * lanes)] = load(x, v, chunk(0))
                for c in range(1, full):
                    acc[chunk(v * lanes)] = T.max(acc[chunk(v * lanes)], load(x, v, chunk(c * lanes)))
                if has_tail:
                    acc[chunk(v * lanes)] = T.max(acc[chunk(v * lanes)], load(x, v, chunk(last)))
                stat[v] = acc[v * lanes]
                for u in range(1, lanes):
                    stat[v] = T.max(stat[v], acc[v * lanes + u])
                # e = exp(x - max), summed lane-wise (of the last vector only the tail's lanes)
                acc[chunk(v * lanes)] = T.Broadcast(T.float32(0), lanes)
                for c in range(full):
                    T.buffer_store(e_of(y, e), _exp(load(x, v, chunk(c * lanes)) - T.Broadcast(stat[v], lanes), lanes),
                                   e_at(v, chunk(c * lanes)))
                    acc[chunk(v * lanes)] = acc[chunk(v * lanes)] + e_load(y, e, v, chunk(c * lanes))
                if has_tail:
                    T.buffer_store(e_of(y, e), _exp(load(x, v, chunk(last)) - T.Broadcast(stat[v], lanes), lanes),
                                   e_at(v, chunk(last)))
                    acc[chunk(v * lanes)] = acc[chunk(v * lanes)] + T.Select(
                        in_tail, e_load(y, e, v, chunk(last)), T.Broadcast(T.float32(0), lanes))
                stat[v] = acc[v * lanes]
                for u in range(1, lanes):
                    stat[v] = stat[v] + acc[v * lanes + u]
                # normalise by one reciprocal per row (the epilogue on each vector, TVM vectorising it);
                # the last vector's probabilities are taken first (where e lives in y, the chunk before
                # it overwrites the overlap) and written last
                stat[v] = T.float32(1) / stat[v]
                if has_tail:
                    acc[chunk(v * lanes)] = e_load(y, e, v, chunk(last)) * T.Broadcast(stat[v], lanes)
                for c in range(full):
                    for u in T.vectorized(lanes):
                        T.buffer_store(y, written(e_load(y, e, v, c * lanes + u) * stat[v]), at(v, c * lanes + u))
                if has_tail:
                    for u in T.vectorized(lanes):
                        T.buffer_store(y, written(acc[v * lanes + u]), at(v, last + u))

    return softmax
