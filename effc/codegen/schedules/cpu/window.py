"""Sliding-window kernels: depthwise convolution, max and average pooling, and direct convolution
of a few input channels (1-D or 2-D, NCHW).

Each output pixel reduces a small window (kernel taps, times one input channel) of one input plane,
so there is no GEMM to form (conv_gemm leaves depthwise convs here). One parallel loop over
(image, channel) planes; under it the padded input plane is built in L1 (the pad block computed at
the plane: one copy, no per-tap bound checks), then every output row runs its taps over vectors of
output pixels (unrolled taps), and the epilogue (bias, ReLU, the average's divide) is applied to the
plane while it is in cache. A row's vectors (up to ROW_VECTORS) accumulate side by side in a local
buffer that LLVM keeps in registers: independent chains hide the FMA latency, and sums kept in the
output buffer were a load and a store per tap.

A conv with a few input channels (conv_gemm's ConvShape.direct: an RGB 7x7 stem, 147 taps) sums
over every input plane: there the padded input is built once, and output planes go in blocks that
share each input vector load (block x row vectors accumulators), with no im2col buffer (3 x 49
times the input: memory-bound as a GEMM).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.tirx.analysis import undefined_vars

from effc.codegen.schedules.cpu.base import (
    FLOAT_DTYPES,
    CPURule,
    extent,
    fold_epilogue,
    row_vector_width,
    vector_lanes,
)
from effc.codegen.target import vector_registers

ROW_VECTORS = 8  # at most this many vectors of a row accumulate side by side (FMA latency; registers)
ACCUMULATOR_SHARE = 3 / 4  # of the vector registers, what a direct conv's step may hold sums in (24 of AVX-512's 32)
MAX_TAPS = 256  # a window of at most this many taps per output (7x7 pooling is 49, an RGB 7x7 stem conv 147)


class Window(CPURule):
    name = "window"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or not all(b.is_injective() for b in infos if not b.is_reduction()):
            return None
        main = reductions[0].block_rv
        kinds = reductions[0].dom_kind()
        loops = sch.get_loops(main)
        spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
        taps = [lp for lp, k in zip(loops, kinds) if k == "R"]
        dtype = str(sch.get(main).writes[0].source.dtype)
        sizes = [extent(sch, lp) for lp in loops]
        ordered = "".join(kinds) == "S" * len(spatial) + "R" * len(taps)
        if (dtype not in FLOAT_DTYPES or len(spatial) not in (2, 3, 4) or not ordered or None in sizes
                or not 1 <= _product(sch, taps) <= MAX_TAPS or not _windowed(sch.get(main))):
            return None
        pads = list(sch.get_producers(main))
        for block in pads:  # the padded plane, and what produced the input (inlined into it)
            for producer in sch.get_producers(block):
                sch.compute_inline(producer)
        epilogue = fold_epilogue(sch, main)
        dims = len(sch.get(main).writes[0].source.shape) - 2  # window axes: the last loops
        if len(spatial) <= dims:
            return None
        *planes, cols = spatial
        planes, rows = planes[: len(planes) - dims + 1], planes[len(planes) - dims + 1:]
        plane = sch.fuse(*planes) if len(planes) > 1 else planes[0]
        lanes = vector_lanes(dtype, target)
        width = extent(sch, cols)
        vec = row_vector_width(width, lanes)
        if width % lanes and width % (lanes // 2) == 0:
            # half vectors side by side: a whole row of 3.5 vectors LLVM legalises poorly (a 7x7
            # depthwise conv on 56 columns ran 2x slower)
            vec = lanes // 2
        direct = [_sums_channels(sch, main, block) for block in pads]
        for block, shared in zip(pads, direct):
            stride = _deinterleave(sch, main, block)
            if shared:  # every plane reads all of it: built once, in parallel
                pad_loops = sch.get_loops(block)
                sch.parallel(sch.fuse(*pad_loops[:2]) if len(pad_loops) > 2 else pad_loops[0])
            else:
                sch.compute_at(block, plane, preserve_unit_loops=True)
            if stride > 1:  # scalar, a step per phase: vectorised, each lane's store was its own (2x slower)
                sch.unroll(sch.split(sch.get_loops(block)[-1], [None, stride])[1])
            else:
                _vectorize_inner(sch, block, lanes)
        if vec != width:  # a row's vectors (up to ROW_VECTORS of them) accumulate side by side
            cols, inner = sch.split(cols, [None, vec])
            count = extent(sch, cols)
            side = max(d for d in range(1, ROW_VECTORS + 1) if count % d == 0)
            cols, chunks = sch.split(cols, [None, side])
            sch.reorder(*rows, cols, *taps, chunks, inner)
            sch.unroll(chunks)
            block_planes = _plane_block(extent(sch, plane), side, target) if any(direct) else 1
            if block_planes > 1:  # a direct conv: each input vector loaded once for several output planes
                plane, planes_in = sch.split(plane, [None, block_planes])
                sch.reorder(*rows, cols, *taps, planes_in)
                sch.unroll(planes_in)
        else:
            inner = cols
            sch.reorder(*rows, *taps, inner)
        for tap in taps:
            sch.unroll(tap)
        sch.vectorize(inner)
        # the accumulators in a local buffer, written out after the taps: in the output buffer
        # LLVM cannot keep them in registers (it may alias the input), each tap a load and a store
        acc = sch.cache_write(main, 0, "local")
        main_loops = [sch.get(lp) for lp in sch.get_loops(main)]
        above_taps = sch.get_loops(main)[[i for i, lp in enumerate(main_loops) if lp.same_as(sch.get(taps[0]))][0] - 1]
        sch.reverse_compute_at(acc, above_taps, preserve_unit_loops=True)
        _vectorize_inner(sch, acc, lanes)
        for block in epilogue:
            sch.reverse_compute_at(block, plane, preserve_unit_loops=True)
            _vectorize_inner(sch, block, lanes)
        sch.parallel(plane)
        sch.decompose_reduction(main, taps[0])
        return sch


def _plane_block(planes: int, vectors: int, target=None) -> int:
    """Output planes per step of a direct conv: as many as keep the accumulators (planes x a row's
    vectors) within the target's vector registers, with room for the operands."""
    accumulators = int(vector_registers(target) * ACCUMULATOR_SHARE)
    for block in (4, 3, 2):
        if planes % block == 0 and block * vectors <= accumulators:
            return block
    return 1


def _sums_channels(sch, main, pad) -> bool:
    """A direct conv (conv_gemm's ConvShape.direct): a reduction variable indexes the channel axis of
    the padded input, so each output plane reads every input plane."""
    buffer = sch.get(pad).writes[0].source
    reduce_vars = [iv.var for iv in sch.get(main).iter_vars if iv.iter_type == 2]  # 2: CommReduce
    return any(
        any(any(v.same_as(r) for r in reduce_vars) for v in undefined_vars(read.region[1].min))
        for read in sch.get(main).reads if read.source.same_as(buffer))


def _deinterleave(sch, main, pad) -> int:
    """A strided window reads every s-th column of the padded plane: store the plane as s phases
    (column w at [w % s, w // s]) so that a vector of outputs reads contiguous columns, not a
    gather. The stride s, or 1 where the plane is left as it is."""
    from tvm.sym.pattern import detect_linear_equation

    buffer = sch.get(pad).writes[0].source
    width = buffer.shape[-1]
    col_var = sch.get(main).writes[0].region[-1].min  # the output column's block variable
    reads = [r for r in sch.get(main).reads if r.source.same_as(buffer)]
    if not reads or not isinstance(col_var, tirx.Var) or not isinstance(width, tirx.IntImm):
        return 1
    coeff = detect_linear_equation(reads[0].region[-1].min, [col_var])
    stride = int(coeff[0]) if len(coeff) == 2 and isinstance(coeff[0], tirx.IntImm) else 1
    if stride <= 1 or int(width) % stride:
        return 1
    sch.transform_layout(pad, ("write", 0), lambda *idx: (*idx[:-1], idx[-1] % stride, idx[-1] // stride))
    return stride


def _product(sch, loops) -> int:
    out = 1
    for lp in loops:
        out *= extent(sch, lp)
    return out


def _windowed(block) -> bool:
    """Some read index combines an output position with a tap (stride * y + tap): a window, not a
    plain reduction over an axis (a mean over the last axis has bare indices: the reduction rule's)."""
    return any(not isinstance(r.min, (tirx.Var, tirx.IntImm)) for region in block.reads for r in region.region)


def _vectorize_inner(sch, block, lanes: int) -> None:
    """Vectorise the innermost loop of ``block`` (a row) as row_vector_width says."""
    inner = sch.get_loops(block)[-1]
    width = extent(sch, inner)
    if width is None or width < 2:
        return
    vec = row_vector_width(width, lanes)
    if vec != width:
        _, inner = sch.split(inner, [None, vec])
    sch.vectorize(inner)
