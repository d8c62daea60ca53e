"""bf16 matmul (C[s, i, j] = sum_k f32(A[s, i, k]) * f32(B[s, k, j]), A and B bf16) plus fused
epilogues, on AVX-512 BF16 (`vdpbf16ps`): the kernels effc.codegen.bf16_matmul makes.

Same tiling as the fp32 matmul rule (matmul.py; its helpers are shared, not copied): for each
(batch, j-panel) in parallel, for each i-tile, an mr x nr register tile of C accumulates over the
whole k, then the epilogue runs as the tile's write-back (fold_epilogue). The tile itself is one
call of effc/kernels/bf16_tile.c (effc.codegen.bf16_tile_call). Layouts:
B as [n / nr, k / 2, nr, 2] panels (each k pair of a column side by side, what vdpbf16ps
multiplies), pre-packed at compile time for a weight; a computed B (attention) is read in place,
row-major [k, n], and the C tile packs each panel once per call. A is read in place: where m or k
needs padding, the C tile computes the edge tiles' rows and columns only (a stage, zero-padded, is
left for A reached through a gather or rows fused across batch dims). A ragged n keeps the full
nr (the edge panel computes only its vectors).
Knobs as matmul's: mr, nr_vectors; on a CPU with AMX-BF16 the tile defaults to all rows x 2 vectors
(AMX_FITTING) and the C tile computes it in 16 x 16 AMX tiles. Only on CPUs with avx512bf16: elsewhere the fp32 matmul rule
takes these kernels (TVM's bf16 legalisation computes them in fp32), and --precision never makes
them there (effc.codegen.precision).
"""

from __future__ import annotations

from typing import ClassVar

from tvm import s_tir, tirx

from effc.codegen.bf16_tile_call import LANES, TILE_KEY
from effc.codegen.peel_tail import FULL_PANELS_KEY
from effc.codegen.schedules.cpu.base import RegisterTileRule, extent, one_reduction
from effc.codegen.schedules.cpu.matmul import _pick_mr
from effc.codegen.schedules.cpu.panels import matmul_gemm, packs_a_weight, weight_params, write_back_at

FITTING = ((6, 4), (8, 3), (12, 2), (8, 2), (4, 4))  # tiles near the peak, best first (mr, nr_vectors)
MAX_ROWS = {1: 16, 2: 12, 3: 8, 4: 6}  # nr_vectors -> most rows of a tile bf16_tile.c has (<= 24 of 32 zmm)
# AMX: a call computes a whole panel's rows (up to AMX_MAX_ROWS) in 16 x 16 tiles (bf16_tile.c's
# amx_tile: two row blocks x two column blocks, each A and B tile used twice). Fewer, longer calls
# amortise the tile configuration check (sttilecfg, hundreds of cycles): 1 thread, against 32-row
# tiles, vit-s16's linears 16.4 -> 15.0 ms, bert-base's 33.6 -> 32.1. Two vectors a panel: four
# (64 columns) was within noise of it on vit and 3% slower on bert (whose weights stream from memory)
AMX_FITTING = ((256, 2), (256, 1))
AMX_MAX_ROWS = 256
# a computed B (attention's K^T, V: packed by the C tile per panel) takes whole rows of C in one panel,
# up to this many vectors: vit-s16's Q.K^T (197 x 197 x 64 a head), 1 thread, 0.133 ms in 2-vector
# panels, 0.110 in 4, 0.103 in one 13-vector panel (C written row by row, B packed once a head)
AMX_ACTIVATION_VECTORS = 16
# an output larger than this goes to memory, not L2: 4-vector panels write whole rows of 256 bytes
# (gpt2's LM head, 128 x 768 x 50257, 1 thread: 23.4 ms in 2-vector panels, 17.4 in 4, 18.3 in 8;
# bert's linears, whose outputs stay in L2, 3-7% slower in 4 than in 2)
AMX_WIDE_OUTPUT_BYTES = 4 << 20


def has_avx512_bf16(target) -> bool:
    """Whether ``target`` (a tvm llvm Target) may run vdpbf16ps."""
    from effc.codegen.target import cpu_has

    return cpu_has(target, "avx512bf16")


def has_amx_bf16(target) -> bool:
    """Whether the rule builds AMX-sized tiles for ``target``: its CPU has AMX-BF16 and EFFC_AMX is not
    0 (as the int8 rule; the kernel still checks at run time that the OS granted the tiles, and
    falls back to vdpbf16ps)."""
    import os

    from effc.codegen.target import cpu_has

    return os.environ.get("EFFC_AMX") != "0" and cpu_has(target, "amx-bf16")


class MatmulBf16(RegisterTileRule):
    """Default tile 6 x 4 vectors: 24 accumulators and 10 loads per 24 vdpbf16ps (165 GFLOP/s per core
    on znver4 at 2.6 GHz, ~ its peak; 8 x 2: 149); with AMX, all rows (up to 256) x 2."""

    name = "matmul-bf16"
    KNOBS: ClassVar[dict] = {"mr": (4, 6, 8, 12, 16, 32, 256), "nr_vectors": (1, 2, 3, 4)}  # 16+: AMX tiles

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm" and has_avx512_bf16(target)

    def recorded(self, func, target) -> dict:
        """Tuned knobs are vdpbf16ps register tiles: none apply on AMX, whose tile (all rows of a
        panel, AMX_FITTING) was chosen in whole models: knobs the tuner found fastest for a kernel
        alone made vit-s16, bert-base and gpt2 1.5-2x slower there (small tiles, many calls)."""
        return {} if has_amx_bf16(target) else super().recorded(func, target)

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        recorded = self.recorded(func, target)
        amx = has_amx_bf16(target)
        knobs = {**self.default_knobs(), **({"mr": AMX_FITTING[0][0], "nr_vectors": AMX_FITTING[0][1]} if amx else {})}
        sch = self.schedule(func, **{**knobs, **recorded}, fit=not recorded, amx=amx)
        if sch is not None:
            from effc.kernels import native

            native.load("bf16_tile")  # the tile's symbol, for modules built and run in this process
        return sch

    def schedule(self, func, mr: int, nr_vectors: int, fit: bool = False, target=None, amx: bool = False):
        """``fit``: rather a tile among FITTING (AMX_FITTING with ``amx``) that divides m and n (no
        padding, A read in place)."""
        sch = s_tir.Schedule(func)
        found = one_reduction(sch, target)
        if found is None:
            return None
        main = found[0].block_rv
        stmt = sch.get(main)
        if (str(stmt.writes[0].source.dtype) != "float32" or len(stmt.reads) != 2
                or any(str(r.source.dtype) != "bfloat16" for r in stmt.reads)):
            return None
        gemm = matmul_gemm(sch, main)
        if gemm is None:
            return None
        a_copy, b_copy, c_copy, c_map, (batch, i, j, k), (m, n, kk) = gemm
        if fit and amx and _b_computed(sch, func, main):
            nr_vectors = min(-(-n // LANES), AMX_ACTIVATION_VECTORS)
        elif fit and amx:  # AMX computes partial row blocks as fast: fit the columns only
            choices = ((AMX_MAX_ROWS, 4),) + AMX_FITTING if m * n * 4 > AMX_WIDE_OUTPUT_BYTES else AMX_FITTING
            mr, nr_vectors = next(((r, v) for r, v in choices if n % (v * LANES) == 0), choices[0])
        elif fit:
            mr, nr_vectors = next(((r, v) for r, v in FITTING if m % r == 0 and n % (v * LANES) == 0),
                                  (mr, nr_vectors))
        # the C tile computes only the vectors of an edge panel inside n: a ragged n costs at most
        # 15 columns, so the tile keeps its width (pick_nr would narrow it to pad less)
        nr = min(nr_vectors, -(-n // LANES)) * LANES
        if amx:
            mr = min(mr, m, AMX_MAX_ROWS)
        else:
            mr = min(_pick_mr(mr, m, nr_vectors, nr, LANES), MAX_ROWS[nr // LANES])
        pads = [1, mr if m % mr else 1, nr if n % nr else 1, 2 if kk % 2 else 1]
        if pads != [1, 1, 1, 1]:
            sch.pad_einsum(main, pads)
        if not ((pads[1] == 1 and pads[3] == 1 and _read_in_place(sch, main, a_copy))
                or (pads != [1, 1, 1, 1] and _read_padded_in_place(sch, main, a_copy))):
            _parallel_copy(sch, _stage(sch, main, a_copy, 0))
        b_layout = _read_b_in_place(sch, func, main, b_copy)
        if b_layout == B_PACKED:
            _pack_pairs(sch, func, _stage(sch, main, b_copy, 1), nr)

        batch, i, j, k = sch.get_loops(main)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(batch, jo, io, k, ii, ji)
        if not write_back_at(sch, main, io, nr, LANES, c_map, mr):
            return None
        sch.set_scope(main, 0, "local")
        outer = sch.fuse(batch, jo)
        sch.parallel(outer)
        if pads[2] != 1:  # full panels without column checks (effc.codegen.peel_tail.full_panel_pass)
            sch.annotate(outer, FULL_PANELS_KEY, -(-n // nr))
        k_pad = extent(sch, k)
        tile = sch.blockize(k)  # the tile's block keeps its loop nest: effc.codegen.bf16_tile_call lowers it
        sch.annotate(tile, TILE_KEY, [mr, nr, k_pad, m, n, kk, b_layout])
        return sch


def _b_computed(sch, func, main) -> bool:
    """Whether main's B is computed in the model (attention's K^T or V), not a weight."""
    weights = weight_params(func)
    b = sch.get(main).reads[1].source
    producers = [sch.get(p) for p in sch.get_producers(main) if sch.get(p).writes[0].source.same_as(b)]
    sources = [r.source for p in producers for r in p.reads] or [b]
    return not any(s.same_as(w) for s in sources for w in weights)


def _read_in_place(sch, main, a_copy) -> bool:
    """Let main read A where it is (a bf16 parameter: no copy, no conversion in the tile) when each
    tile's rows are rows of A (plain indices after inlining the reindex copy); else False, unchanged."""
    trial = sch.copy()
    trial.compute_inline(a_copy)
    a_read = [r for r in trial.get(main).reads if str(r.source.dtype) == "bfloat16"][0]  # A, then B
    if not all(isinstance(r.min, (tirx.Var, tirx.IntImm)) for r in a_read.region) or not _rows_of_k(trial, main, a_read):
        return False
    sch.compute_inline(a_copy)
    return True


def _read_padded_in_place(sch, main, a_copy) -> bool:
    """As _read_in_place where m or k was padded: main reads A's rows where they are, the zero
    padding only a condition in its plain loop nest; the C tile computes an edge tile's rows inside
    m and reads k columns, never the padding (effc.codegen.bf16_tile_call). No copy of A, and
    no per-tile conversion of a staged one (TVM widens a bf16 buffer inside a kernel to fp32)."""
    trial = sch.copy()
    pad = _stage(trial, main, a_copy, 0)
    trial.compute_inline(pad)
    a_read = [r for r in trial.get(main).reads if str(r.source.dtype) == "bfloat16"]
    if (len(a_read) != 2 or not all(isinstance(r.min, (tirx.Var, tirx.IntImm)) for r in a_read[0].region)
            or not _rows_of_k(trial, main, a_read[0])):
        return False
    pad = _stage(sch, main, a_copy, 0)
    sch.compute_inline(pad)
    return True


def _rows_of_k(sch, main, a_read) -> bool:
    """A is read as rows [.., i, k] (k contiguous, what the C tile reads k pairs from), not
    transposed (a conv's col with its pixels as the rows: [.., k, i])."""
    k = sch.get(main).iter_vars[-1].var
    return a_read.region[-1].min.same_as(k)


B_PACKED, B_PLAIN, B_ROWS = 0, 1, 2  # how the C tile reads B (TILE_KEY's last entry)


def _read_b_in_place(sch, func, main, b_copy) -> int:
    """Let main read a computed B (not a weight: those are packed at compile time) where it is: a
    row-major [k, n] matrix (B_PLAIN: attention's V), or its rows [n, k] (B_ROWS: K's rows for
    Q.K^T, effc.codegen.product_nt), whose panels the C tile packs, vectorised, by each panel's
    first row tile: no per-call packing loop in TIR (a scalar scatter into a buffer TVM widens to
    fp32) and no second conversion. B_PACKED, unchanged, when B is a weight or read otherwise."""
    weights = weight_params(func)
    trial = sch.copy()
    stage = _stage(trial, main, b_copy, 1)
    if any(r.source.same_as(w) for r in trial.get(stage).reads for w in weights):
        return B_PACKED
    trial.compute_inline(stage)
    block = trial.get(main)
    reads = [r for r in block.reads if str(r.source.dtype) == "bfloat16"]
    if len(reads) != 2 or reads[0].source.same_as(reads[1].source):
        return B_PACKED
    j, k = (iv.var for iv in block.iter_vars[-2:])
    region = reads[1].region
    if not all(isinstance(r.min, (tirx.Var, tirx.IntImm)) for r in region):
        return B_PACKED
    layout = (B_PLAIN if region[-2].min.same_as(k) and region[-1].min.same_as(j) else
              B_ROWS if region[-2].min.same_as(j) and region[-1].min.same_as(k) else B_PACKED)
    if layout != B_PACKED:
        sch.compute_inline(_stage(sch, main, b_copy, 1))
    return layout


def _stage(sch, main, copy, operand: int):
    """The block writing main's ``operand`` (0: A, 1: B): the reindex copy, or the zero-padding
    block with the copy inlined into it."""
    producers = [b for b in sch.get_producers(main)
                 if sch.get(b).writes[0].source.same_as(sch.get(main).reads[operand].source)]
    block = producers[0]
    if not sch.get(block).same_as(sch.get(copy)):
        sch.compute_inline(copy)
    for producer in sch.get_producers(block):  # a gather fused before the GEMM
        sch.compute_inline(producer)
    return block


def _pack_pairs(sch, func, panel, nr: int) -> None:
    """B as [n / nr, k / 2, nr, 2] (per batch): a weight's packing runs once at compile time, a
    computed B's per call, in parallel over panels."""
    batch = int(sch.get(panel).writes[0].source.shape[0])
    if batch == 1:
        layout = lambda s, j, k: (j // nr, k // 2, j % nr, k % 2)  # noqa: E731
    else:
        layout = lambda s, j, k: (s, j // nr, k // 2, j % nr, k % 2)  # noqa: E731
    sch.transform_layout(panel, ("write", 0), layout)
    if packs_a_weight(sch, func, panel):
        return
    _parallel_copy(sch, panel)


def _parallel_copy(sch, block) -> None:
    loops = sch.get_loops(block)
    if len(loops) >= 2:
        sch.parallel(sch.fuse(*loops[:-1]))
