"""Dense and batched matmul (C[s, i, j] = sum_k A[s, i, k] * B[s, k, j]) plus fused epilogues.

The kernel is normalised to [batch, i, j, k] loops, then tiled into an ``mr x nr`` register block:
for each (batch, j-panel) in parallel, for each i-tile, the k loop accumulates an mr x nr tile of C
held in registers (i unrolled, j vectorised over AVX-512 lanes), and the epilogue (bias, GELU,
residual add, scale: whatever FuseOps put after the matmul) is applied when the tile is written back.
B is read as [n / nr, k, nr] panels: a constant weight is packed once at compile time, a computed B
(attention's K^T, V) per call. An n that is not a multiple of nr is padded to one (zero columns in
the panel; the write-back of the last tile is masked), an m that is not a multiple of mr leaves a
bound check on the unrolled rows.
Knobs: mr (rows per tile), nr_vectors (j width in vector registers); `effc tune` searches them. k is
not blocked yet: one j-panel of B is a contiguous stream that stays in L2 across the i tiles. The k
loop carries PREFETCH_KEY, by which effc.codegen.prefetch streams the next panel of a large weight in.
"""

from __future__ import annotations

from typing import ClassVar

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import get_index_map

from effc.codegen.records import knobs_for
from effc.codegen.schedules.cpu.base import CPURule, ancestors, descendants, extent, fold_epilogue, one_reduction

PAD_WASTE = 1 / 32  # padding of n (computed, then discarded) worth a wider register tile
MAX_MR = 16  # rows of a tile: each is one broadcast per k step
PREFETCH_KEY = "effc.prefetch_panel_nr"  # on the k loop: the panel width, for effc.codegen.prefetch


class Matmul(CPURule):
    name = "matmul"

    KNOBS: ClassVar[dict] = {"mr": (4, 6, 8, 12, 16), "nr_vectors": (1, 2, 3, 4)}  # the tuner's search space

    def __init__(self, mr: int = 8, nr_vectors: int = 2, records: dict | None = None):
        self.mr, self.nr_vectors, self.records = mr, nr_vectors, records
        self.tuned_kernels = 0  # kernels scheduled with recorded knobs (the build reports it)

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        recorded = knobs_for(self.records, self.name, func, target)
        sch = self.schedule(func, **{"mr": self.mr, "nr_vectors": self.nr_vectors, **recorded})
        self.tuned_kernels += bool(recorded and sch is not None)
        return sch

    def schedule(self, func, mr: int, nr_vectors: int):
        sch = s_tir.Schedule(func)
        found = one_reduction(sch)
        if found is None:
            return None
        main, lanes = found[0].block_rv, found[1]
        if not _plain_access(sch.get(main)) or get_index_map(sch.get(main)) is None:
            return None
        _inline_side_inputs(sch, main)

        # Normalise to C[S, I, J] += A[S, I, K] * B[S, J, K]. A's reindex copy is inlined back
        # below (the kernel reads A in place); B's copy becomes the [n / nr, k, nr] panel.
        a_copy = sch.reindex(main, ("read", 0))
        b_copy = sch.reindex(main, ("read", 1))
        c_copy = sch.reindex(main, ("write", 0))
        block_map, a_map, b_map, c_map = get_index_map(sch.get(main))
        sch.transform_layout(a_copy, ("write", 0), a_map)
        sch.transform_layout(b_copy, ("write", 0), b_map)
        sch.transform_layout(c_copy, ("read", 0), c_map)
        sch.transform_block_layout(main, block_map)
        batch, i, j, k = sch.get_loops(main)
        m, n, kk = extent(sch, i), extent(sch, j), extent(sch, k)
        if m is None or n is None or kk is None:
            return None
        nr = _pick_nr(n, lanes, nr_vectors)
        padded = n % nr != 0
        if padded:
            # Ragged n (gpt2's 50257-wide LM head, 197-token attention): compute a zero-padded
            # n_pad = ceil(n / nr) * nr wide result so every tile is a full vector tile; the B
            # panel is zero-padded and only the write-back is trimmed to n.
            sch.pad_einsum(main, [1, 1, nr, 1])
        mr = _pick_mr(mr, m, nr_vectors, nr, lanes)

        sch.compute_inline(a_copy)
        panel = _b_panel(sch, main, b_copy, padded)
        batch, i, j, k = sch.get_loops(main)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(batch, jo, io, k, ii, ji)
        _pack_panel(sch, func, panel, nr)
        # The epilogue becomes the tile write-back: it runs right after each tile's k loop, while
        # the accumulator shrinks to one mr x nr register tile.
        if not _write_back_at(sch, main, io, nr, lanes, c_map, mr):
            return None
        sch.set_scope(main, 0, "local")
        sch.unroll(ii)
        _vectorize(sch, ji, lanes)
        sch.parallel(sch.fuse(batch, jo))
        sch.decompose_reduction(main, k)
        sch.annotate(k, PREFETCH_KEY, nr)  # effc.codegen.prefetch streams the next panel in
        return sch


def _plain_access(stmt) -> bool:
    """Every index of every access is a bare loop variable (or a constant): a true (batched) matmul.
    A convolution also fits the S/I/J/K pattern (A[n, c, h*16 + ry, ...]) but its im2col
    normalisation produced wrong results here: conv_gemm hands this rule convs as plain GEMMs over
    an im2col buffer, and the window rule takes the rest (depthwise, a few input channels)."""
    from tvm import tirx

    for region in list(stmt.reads) + list(stmt.writes):
        for r in region.region:
            if not isinstance(r.min, (tirx.Var, tirx.IntImm)):
                return False
    return True


def _b_panel(sch, main, b_copy, padded: bool):
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


def _pack_panel(sch, func, panel, nr: int) -> None:
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
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    weights = [func.params[int(i)] for i in free] if free else []  # TVM 0.27: a param is its buffer
    reads = sch.get(panel).reads
    if len(reads) == 1 and any(reads[0].source.same_as(w) for w in weights):
        sch.annotate(panel, "meta_schedule.layout_rewrite_preproc", True)
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


def _pick_nr(n: int, lanes: int, nr_vectors: int) -> int:
    """Widest j tile of at most ``nr_vectors`` vectors that divides n, or else that pads n by at
    most PAD_WASTE of its width (gpt2's 50257-wide head: 64 pads 47 columns, where the 32 that
    pads 15 would halve the register tile); failing both, the tile that pads n least."""
    widths = [v * lanes for v in range(nr_vectors, 0, -1)]
    for nr in widths:
        if n % nr == 0 or (-(-n // nr) * nr - n) <= PAD_WASTE * n:
            return nr
    return min(widths, key=lambda nr: (-(-n // nr) * nr - n, -nr))


def _pick_mr(mr: int, m: int, nr_vectors: int, nr: int, lanes: int) -> int:
    """Rows per tile: the knob, scaled up when n forced a narrower tile than ``nr_vectors``, so
    the tile keeps its count of accumulators (independent FMA chains); at most m."""
    return min(m, MAX_MR, mr * max(1, nr_vectors * lanes // nr))


def _write_back_at(sch, main, loop, nr: int, lanes: int, c_map=None, mr: int = 1) -> bool:
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
            _vectorize(sch, last, lanes)
    return True


def _reindex_rows(sch, block, c_map) -> bool:
    """Re-index ``block`` (an output writer) by C's map when its loops match C's dims."""
    try:
        sch.transform_block_layout(block, c_map)
    except Exception:  # noqa: BLE001 (TVM raises ScheduleError or TVMError for a misfit)
        return False
    return True


def _vectorize(sch, loop, lanes: int) -> None:
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


def _inline_side_inputs(sch, main) -> None:
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
