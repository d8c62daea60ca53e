"""The register-tile pieces the matmul and gemv rules share: B packed into contiguous [n / nr, k, nr]
panels (at compile time for a constant weight), the j tile width, the epilogue folded into the tile
write-back, and a tile's vectorisation."""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import get_index_map

from effc.codegen.schedules.cpu.base import ancestors, descendants, extent, fold_epilogue

PAD_WASTE = 1 / 32  # padding of n (computed, then discarded) worth a wider register tile


def weight_params(func) -> list:
    """The buffers of ``func``'s layout-free params (the model's weights; TVM 0.27: a param is its
    buffer)."""
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    return [func.params[int(i)] for i in free] if free else []


def packs_a_weight(sch, func, panel) -> bool:
    """Whether ``panel`` packs a weight alone: then it is marked to run once, at compile time
    (effc.codegen.prefold), never per call."""
    reads = sch.get(panel).reads
    if len(reads) == 1 and any(reads[0].source.same_as(w) for w in weight_params(func)):
        sch.annotate(panel, "meta_schedule.layout_rewrite_preproc", True)
        return True
    return False


def matmul_gemm(sch, main):
    """The matmul rules' common start: ``main``'s side inputs inlined and the block normalised by
    to_batched_gemm (its result), or None when ``main`` is not a true (batched) matmul: an access
    that is not plain loop variables, or no matmul index map."""
    stmt = sch.get(main)
    if not plain_access(stmt) or get_index_map(stmt) is None:
        return None
    inline_side_inputs(sch, main)
    return to_batched_gemm(sch, main)


def plain_access(stmt) -> bool:
    """Every index of every access is a bare loop variable (or a constant): a true (batched) matmul.
    A convolution also fits the S/I/J/K pattern (A[n, c, h*16 + ry, ...]) but its im2col
    normalisation produced wrong results here: conv_gemm hands the matmul rule convs as plain GEMMs
    over an im2col buffer, and the window rule takes the rest (depthwise, a few input channels)."""
    for region in list(stmt.reads) + list(stmt.writes):
        for r in region.region:
            if not isinstance(r.min, (tirx.Var, tirx.IntImm)):
                return False
    return True


def to_batched_gemm(sch, main):
    """Normalise the reduction block ``main`` to C[S, I, J] += A[S, I, K] * B[S, J, K] through reindex
    copies of its operands: (a_copy, b_copy, c_copy, C's index map, its loops (batch, i, j, k), extents
    (m, n, k)), or
    None where an extent is not static. The caller inlines A's copy back (the kernel reads A in place)
    and makes B's copy its packed panel."""
    a_copy = sch.reindex(main, ("read", 0))
    b_copy = sch.reindex(main, ("read", 1))
    c_copy = sch.reindex(main, ("write", 0))
    block_map, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(a_copy, ("write", 0), a_map)
    sch.transform_layout(b_copy, ("write", 0), b_map)
    sch.transform_layout(c_copy, ("read", 0), c_map)
    sch.transform_block_layout(main, block_map)
    loops = sch.get_loops(main)
    extents = tuple(extent(sch, loop) for loop in loops[1:])
    if None in extents:
        return None
    return a_copy, b_copy, c_copy, c_map, loops, extents


def b_panel(sch, main, b_copy, padded: bool):
    """The block that writes the B operand main reads: the reindex copy of B (layout [S, J, K]), or
    after padding the zero-padding block, with the copy inlined into it. Any other producer (the
    padding of A, if TVM made one) is inlined into main."""
    panel = b_copy
    if padded:
        panel = sch.get_consumers(b_copy)[0]
        sch.compute_inline(b_copy)
    for block in sch.get_producers(main):
        if not _same_block(sch, block, panel):
            sch.compute_inline(block)
    for block in sch.get_producers(panel):  # a gather fused before the GEMM (conv_gemm's im2col)
        sch.compute_inline(block)
    return panel


def pack_panel(sch, func, panel, nr: int) -> None:
    """Give B the blocked layout [n / nr, k, nr] (per batch), so one j-panel is a contiguous stream
    instead of k rows a full row-stride apart.

    A constant weight's panel block is marked as a layout rewrite, which the build splits out and
    runs once at compile time (never per inference); a computed B (attention's K^T and V) is packed
    per call, which costs k * n against the matmul's m * k * n."""
    batch = int(sch.get(panel).writes[0].source.shape[0])  # panel buffer: [S, J, K]
    if batch == 1:
        layout = lambda s, j, k: (j // nr, k, j % nr)  # noqa: E731
    else:
        layout = lambda s, j, k: (s, j // nr, k, j % nr)  # noqa: E731
    sch.transform_layout(panel, ("write", 0), layout)
    if packs_a_weight(sch, func, panel):
        return
    loops = sch.get_loops(panel)  # the reindex loops run over [S, J, K] (S dropped when it is 1)
    if len(loops) not in (2, 3):
        return
    *outer, j, k = loops
    jo, ji = sch.split(j, [None, nr])
    sch.reorder(*outer, jo, k, ji)
    sch.vectorize(ji)
    sch.parallel(sch.fuse(*outer, jo))


def _same_block(sch, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


def pick_nr(n: int, lanes: int, nr_vectors: int) -> int:
    """Widest j tile of at most ``nr_vectors`` vectors that divides n, or else that pads n by at
    most PAD_WASTE of its width (gpt2's 50257-wide head: 64 pads 47 columns, where the 32 that
    pads 15 would halve the register tile); failing both, the tile that pads n least."""
    widths = [v * lanes for v in range(nr_vectors, 0, -1)]
    for nr in widths:
        if n % nr == 0 or (-(-n // nr) * nr - n) <= PAD_WASTE * n:
            return nr
    return min(widths, key=lambda nr: (-(-n // nr) * nr - n, -nr))


def write_back_at(sch, main, loop, nr: int, lanes: int, c_map=None, mr: int = 1) -> bool:
    """Fold the epilogue into the blocks writing the result and run them under ``loop`` (after
    each tile, or each panel), vectorised over the panel's nr columns. False when a tile's rows
    cannot be written back exactly.

    When the rows I fuse several output dims (x[2, 197, k] @ W: I = 2 * 197 rows, or a 4-D
    x[1, 28, 28, k]), a row tile can straddle two of them. compute_at covers such a tile by a
    rectangle in the output's own dims, which spans rows the tile never computed (garbage
    written over finished rows), so each writer is first re-indexed by C's map: its loops then
    run over the same fused [S, I, J] rows as the tile, and the region is exact. (No ``c_map``:
    the caller's tiles hold whole rows, as gemv's one-row panels do.)"""
    fused_rows = c_map is not None and not isinstance(c_map.final_indices[1], tirx.Var)
    for block in fold_epilogue(sch, main):
        if fused_rows and not _reindex_rows(sch, block, c_map):
            rows = [extent(sch, lp) for lp in sch.get_loops(block)][-2:-1]  # the innermost row dim
            if not rows or rows[0] is None or rows[0] % mr:
                return False  # a writer of another shape (a transpose) under straddling tiles
        sch.reverse_compute_at(block, loop, preserve_unit_loops=True)
        last = sch.get_loops(block)[-1]
        if extent(sch, last) == nr:  # masked in the last tile of a padded n (build_config)
            vectorize(sch, last, lanes)
    return True


def _reindex_rows(sch, block, c_map) -> bool:
    """Re-index ``block`` (an output writer) by C's map when its loops match C's dims."""
    try:
        sch.transform_block_layout(block, c_map)
    except Exception:  # noqa: BLE001 (TVM raises ScheduleError or TVMError for a misfit)
        return False
    return True


def vectorize(sch, loop, lanes: int) -> None:
    """Vectorise ``loop`` (nr columns). A width of 3 vectors is split into 3 unrolled vectors:
    LLVM's <48 x float> is no legal type, and it spilled and reshuffled the accumulators at every
    k step (3 GFLOP/s instead of 160)."""
    width = extent(sch, loop)
    vectors = width // lanes if width and width % lanes == 0 else 0
    if vectors > 1 and vectors & (vectors - 1):
        outer, inner = sch.split(loop, [vectors, lanes])
        sch.unroll(outer)
        sch.vectorize(inner)
    else:
        sch.vectorize(loop)


def inline_side_inputs(sch, main) -> None:
    """Inline blocks that feed the epilogue without coming from the matmul (a per-row scale times a
    per-column mean, added to the product): left at root, they would block moving the epilogue
    into the tile loop."""
    related = [sch.get(b) for b in [main, *descendants(sch, main), *ancestors(sch, main)]]
    for block in sch.get_child_blocks(get_root_block(sch)):
        if any(sch.get(block).same_as(r) for r in related):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # an output block, or one that cannot be inlined: leave it
            pass
