"""u8 x s8 -> s32 matmul on AVX-512 VNNI (``vpdpbusd``) plus the fused float epilogue.

The kernels come from effc.codegen.qdq_lowering: ``acc[s, i, j] = sum_k int32(A[s, i, k]) *
int32(B[k, j])`` (A the u8 activation, B the s8 weight) followed by whatever FuseOps put after it
(zero-point correction, dequant scale, bias, GELU, residual add, the requantising QuantizeLinear).
The tiling is the float matmul rule's (effc.codegen.schedules.cpu.matmul): per (batch, j-panel) in
parallel, per i-tile, the k loop accumulates an mr x nr int32 tile in registers, and the epilogue
runs as the tile's write-back. What differs is the inner step: one ``vpdpbusd`` multiplies 4
consecutive bytes of a row of A (broadcast to all 16 lanes) by 16 columns x 4 k-bytes of B and adds
the 4 products per lane into 16 int32 accumulators. B is therefore packed, once at compile time,
as [n / nr, k / 4, nr, 4] (4 k-bytes interleaved per int32 lane). n is padded to whole panels, m to
whole row tiles and k to a multiple of 4, with zeros (padded A columns meet zero weights); A's
padded copy is made once per call.
Knobs: mr, nr_vectors (as the float rule).
On a target with AMX-INT8 (and EFFC_AMX not 0 when building) the tile is AMX-sized instead: its k
loop is blockized and marked, and effc.codegen.int8_tile_call makes it one call of
effc/kernels/int8_tile.c (tdpbusd / tdpbsud 16 x 16 tiles; vpdpbusd where the process gets no tile
state). Same panels and write-back; the edge tiles compute only their rows and columns inside
m x n and read only k columns of A, so A is read in place (no padded copy per call) and padding m
or n costs no tile products.
"""

from __future__ import annotations

import os

from tvm import s_tir

from effc.codegen.int8_tile_call import TILE_KEY
from effc.codegen.schedules.cpu import panels
from effc.codegen.schedules.cpu.base import RegisterTileRule, extent, single_reduction
from effc.codegen.peel_tail import FULL_PANELS_KEY
from effc.codegen.vnni_pass import MARK

LANES = 16  # int32 lanes of a zmm register: output columns per vpdpbusd
K_STEP = 4  # k-bytes per int32 lane
# attention's products (k = 64 in Q.K^T, n = 64 in P.V, B packed per call): smaller tiles than the
# linears' 6 x 4 vectors. Measured on vit-s16 and bert-base (1 thread, Zen 4): bert's Q.K^T and P.V
# 11-15% faster in 4 x 4 tiles than in 6 x 4, vit's Q.K^T (197 keys: one vector a panel) 10% faster
# in 12 x 1 than in the 24 x 1 that 6 x 4 became (fewer padded rows, and with k = 64 a tile's write-back
# weighs as much as its k loop)
ACTIVATION_ACCUMULATORS = 16
ACTIVATION_ROWS = 12
FEW_PANELS = 4  # fewer (batch, panel) pairs than this: the row tiles run in parallel too
# the AMX tile: 2 x 2 blocks of 16 x 16 int32 (4 accumulator tiles, 2 A and 2 B tiles per 64-byte k
# step: 4 tile products per 4 loads); a call takes all of a panel's rows (up to 256), so the tile
# configuration is checked once a panel: vit-s16 (all-ops QDQ, 1 thread) 17.5 -> 16.1 ms against
# 32-row calls. Attention's panels as wide as the row (as the bf16 rule does) measured within noise.
AMX_ROWS = 256
AMX_VECTORS = 2
# fewer rows than this stay on VNNI register tiles: a tile product costs about the same for 1 row as
# for 16 (measured, 1 x 768 x 768: VNNI 1.4x faster; 4 rows 1.15x; 8 rows AMX 1.5x faster)
AMX_MIN_ROWS = 8


def has_vnni(target) -> bool:
    from effc.codegen.target import cpu_has

    return cpu_has(target, "avx512vnni")


def has_amx_int8(target) -> bool:
    """Whether the rule builds AMX tiles for ``target``: it has AMX-INT8, and EFFC_AMX is not 0 (which
    also keeps the built tiles off AMX at run time: the VNNI register tiles are then the better ones)."""
    from effc.codegen.target import cpu_has

    return os.environ.get("EFFC_AMX") != "0" and cpu_has(target, "amx-int8", "amx-tile")


class Int8Matmul(RegisterTileRule):
    name = "int8-matmul"

    def recorded(self, func, target) -> dict:
        """Tuned knobs are VNNI register tiles: none apply where the rule builds AMX tiles."""
        return {} if has_amx_int8(target) else super().recorded(func, target)

    def apply(self, func, target, tunable):
        if not self.is_target_available(target) or not has_vnni(target):
            return None
        if has_amx_int8(target):
            sch = self.schedule(func, AMX_ROWS, AMX_VECTORS, amx=True)
            if sch is not None:
                from effc.kernels import native

                native.load("int8_tile")  # the tile's symbol, for modules built and run in this process
                return sch
        recorded = self.recorded(func, target)
        pixels = _conv_pixels(func)
        if pixels is not None:  # a conv GEMM (its col packed per call too): its own tile, conv_knobs
            return self.schedule(func, **{**conv_knobs(pixels), **recorded})
        return self.schedule(func, **{**self.default_knobs(), **recorded},
                             activation_tile=not recorded and _b_is_activation(func))

    def schedule(self, func, mr: int, nr_vectors: int, target=None, activation_tile: bool = False,
                 amx: bool = False):
        """``func`` tiled mr x nr_vectors (``target``: unused, VNNI's tile is the same on every AVX-512 CPU), or None.
        ``activation_tile``: B is an activation (attention's K^T or V, packed per call): the tile holds
        at most ACTIVATION_ACCUMULATORS vectors and ACTIVATION_ROWS rows, whatever mr says.
        ``amx``: one call of the C tile per mr x nr tile (int8_tile_call) instead of vpdpbusd steps;
        None for fewer than AMX_MIN_ROWS rows."""
        sch = s_tir.Schedule(func)
        main = _int8_reduction(sch)
        gemm = None if main is None else panels.matmul_gemm(sch, main)
        if gemm is None:
            return None
        a_copy, b_copy, c_copy, c_map, (batch, i, j, k), (m, n, kk) = gemm
        if amx and m < AMX_MIN_ROWS:
            return None
        if amx:  # an edge tile computes only its rows and columns: a ragged n keeps the tile's width
            nr, mr = min(nr_vectors, -(-n // LANES)) * LANES, min(m, mr)
        else:
            nr = panels.pick_nr(n, LANES, nr_vectors)
            if activation_tile:
                mr = min(m, ACTIVATION_ROWS, ACTIVATION_ACCUMULATORS // (nr // LANES))
            else:
                mr = min(m, mr * max(1, nr_vectors * LANES // nr))
        padded = n % nr != 0
        pad_k = kk % K_STEP != 0
        # m is padded too: a bound check on the tile's rows would sit in the k loop (a branch per
        # vpdpbusd, and LLVM keeps the guarded accumulators in memory)
        pad_m = m % mr != 0
        if padded or pad_k or pad_m:
            sch.pad_einsum(main, [1, mr, nr, K_STEP])
        a_pad = _a_padding(sch, main, a_copy) if pad_k or pad_m else None
        if amx:  # the C tile reads A's rows in place, never the padding: a copy only for a gathered A
            a_pad = _a_stage(sch, main, a_pad or a_copy)
        elif a_pad is None:
            sch.compute_inline(a_copy)
        panel = _b_panel(sch, main, b_copy, padded or pad_k, a_pad)
        batch, i, j, k = sch.get_loops(main)
        io, ii = sch.split(i, [None, mr])
        if amx:
            jo, ji = sch.split(j, [None, nr])
            sch.reorder(batch, jo, io, k, ii, ji)
        else:
            jo, jv, ji = sch.split(j, [None, nr // LANES, LANES])
            ko, ki = sch.split(k, [None, K_STEP])
            sch.reorder(batch, jo, io, ko, ii, jv, ji, ki)
        _pack_panel(sch, func, panel, nr)
        if not panels.write_back_at(sch, main, io, nr, LANES, c_map, mr):
            return None
        if padded:
            for block in sch.get_consumers(main):
                _rows_in_registers(sch, block)
        sch.set_scope(main, 0, "local")
        if not amx:
            sch.unroll(ii)
            sch.unroll(jv)
        # few panels (a conv's late stage: 49 pixels are one panel) leave threads idle: the row tiles
        # are shared out too; padded, only for a single panel (its column checks stay in the write-back)
        pairs = (extent(sch, batch) or 1) * -(-n // nr)
        few = m > mr and pairs < FEW_PANELS and (not padded or pairs == 1)
        outer = sch.fuse(batch, jo, io) if few else sch.fuse(batch, jo)
        sch.parallel(outer)
        if padded and not few:  # full panels without column checks (effc.codegen.peel_tail.full_panel_pass)
            sch.annotate(outer, FULL_PANELS_KEY, -(-n // nr))
        if a_pad is not None:  # the (zero-padded) copy of A: once per call, before the tiles
            loops = sch.get_loops(a_pad)
            sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
        if amx:
            k_pad = extent(sch, k)
            tile = sch.blockize(k)  # the tile's block keeps its loop nest: effc.codegen.int8_tile_call lowers it
            sch.annotate(tile, TILE_KEY, [mr, nr, k_pad, m, n, kk])
            return sch
        init = sch.decompose_reduction(main, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        # tensorize segfaults in this TVM; effc.codegen.vnni_pass puts vpdpbusd in place of the mark
        sch.annotate(ji, MARK, 1)
        return sch


def conv_knobs(pixels: int) -> dict:
    """A conv GEMM's tile: its rows are output channels (multiples of 8, which mr 6 pads, with a
    copy of the weight per call) and its columns the pixels; the widest panel of at most 4 vectors
    that divides them (784 = 49 x 16: 1 vector, 22% faster than 4 with one padded panel), 16
    accumulators (4 x 4, 8 x 2, 16 x 1)."""
    vectors = next((v for v in (4, 3, 2, 1) if pixels % (LANES * v) == 0), 4)
    return {"mr": 16 // vectors if vectors != 3 else 4, "nr_vectors": vectors}


def _conv_pixels(func) -> int | None:
    """The pixels (columns) of a conv GEMM, s8 weight rows x u8 im2col columns (effc.codegen.qdq_conv);
    None for a linear's u8 x s8."""
    sch = s_tir.Schedule(func)
    main = _int8_reduction(sch)
    if main is None or [str(r.source.dtype) for r in sch.get(main).reads] != ["int8", "uint8"]:
        return None
    return int(sch.get(main).writes[0].source.shape[-1])


def _b_is_activation(func) -> bool:
    """Whether the kernel's B operand (the reduction's second read) is no layout-free weight."""
    sch = s_tir.Schedule(func)
    main = _int8_reduction(sch)
    if main is None:
        return False
    b = sch.get(main).reads[1].source
    return not any(w.same_as(b) for w in panels.weight_params(func))


def _rows_in_registers(sch, block) -> None:
    """A per-row side input of the write-back (attention's row sums times a zero point), read into
    a local copy per row: with n padded, TVM masks the vector loop only when every load in it is
    indexed by the vector lane, and a per-row load scalarised the whole write-back (4x slower)."""
    import tvm_ffi
    from tvm import tirx

    blk = sch.get(block)
    col = blk.iter_vars[-1].var

    def uses_col(region) -> bool:
        found = []
        for r in region.region:
            tvm_ffi.structural_map(r.min, lambda node: (found.append(node.same_as(col)), node)[1]
                                   if isinstance(node, tirx.Var) else node)
        return any(found)

    rows = [i for i, r in enumerate(blk.reads) if r.source.scope() != "local" and not uses_col(r)]
    for index in reversed(rows):
        cache = sch.cache_read(block, index, "local")
        sch.compute_at(cache, sch.get_loops(block)[-2])


def _a_stage(sch, main, stage):
    """Inline A's reindex copy, or its zero-padded copy (``stage``), into main when main then reads A
    as plain rows [.., i, k] (what the C tile reads at one row stride, just the rows and k columns
    inside the matrix: the padding is only a condition in the block's plain loop nest) and return
    None; else (a gathered or transposed A) keep ``stage`` as A's copy and return it."""
    from tvm import tirx

    trial = sch.copy()
    try:
        trial.compute_inline(stage)
    except Exception:  # noqa: BLE001 (TVM raises ScheduleError or TVMError: A stays a copy)
        return stage
    block = trial.get(main)
    reads = [r for r in block.reads if str(r.source.dtype) in ("uint8", "int8")]
    i, k = block.iter_vars[-3].var, block.iter_vars[-1].var
    region = reads[0].region if len(reads) == 2 else []
    if (len(region) >= 2 and all(isinstance(r.min, (tirx.Var, tirx.IntImm)) for r in region)
            and region[-1].min.same_as(k) and region[-2].min.same_as(i)):
        sch.compute_inline(stage)
        return None
    return stage


def _int8_reduction(sch):
    """The single u8 x s8 -> s32 reduction block of the kernel (every other block elementwise)."""
    reduction = single_reduction(sch)
    if reduction is None:
        return None
    block = sch.get(reduction.block_rv)
    if str(block.writes[0].source.dtype) != "int32" or len(block.reads) != 2:
        return None
    # u8 rows x s8 columns (a linear), or s8 rows x u8 columns (a conv: W x col, effc.codegen.qdq_conv)
    if [str(r.source.dtype) for r in block.reads] not in (["uint8", "int8"], ["int8", "uint8"]):
        return None
    return reduction.block_rv


def _a_padding(sch, main, a_copy):
    """With k padded, the zero-padded A buffer (kept as its own block: the tensorized step must
    read plain bytes, not a bound check)."""
    for block in sch.get_producers(main):
        if not sch.get(block).same_as(sch.get(a_copy)) and sch.get(block).reads and \
                any(r.source.same_as(sch.get(a_copy).writes[0].source) for r in sch.get(block).reads):
            sch.compute_inline(a_copy)
            return block
    return None


def _b_panel(sch, main, b_copy, padded: bool, a_pad):
    """B's packed panel block (the reindex copy, or its zero-padded form); other producers of
    main (except A's padding) are inlined."""
    panel = b_copy
    if padded:
        panel = sch.get_consumers(b_copy)[0]
        sch.compute_inline(b_copy)
    for block in sch.get_producers(main):
        if not sch.get(block).same_as(sch.get(panel)) and (a_pad is None or not sch.get(block).same_as(sch.get(a_pad))):
            sch.compute_inline(block)
    for block in sch.get_producers(panel):  # a conv's im2col gather: computed in the packing
        sch.compute_inline(block)
    return panel


def _pack_panel(sch, func, panel, nr: int) -> None:
    """B as [n / nr, k / 4, nr, 4]: a constant weight is packed at compile time (layout rewrite)."""
    batch = int(sch.get(panel).writes[0].source.shape[0])
    if batch == 1:
        layout = lambda s, j, k: (j // nr, k // K_STEP, j % nr, k % K_STEP)  # noqa: E731
    else:
        layout = lambda s, j, k: (s, j // nr, k // K_STEP, j % nr, k % K_STEP)  # noqa: E731
    sch.transform_layout(panel, ("write", 0), layout)
    if panels.packs_a_weight(sch, func, panel):
        return
    # an activation (attention's K^T, V) is packed on every call: in parallel over the panels, each
    # panel's k steps in order, so that the writes run contiguously (nr x 4 bytes a step)
    *lead, j, k = sch.get_loops(panel)
    jo, ji = sch.split(j, [None, nr])
    ko, ki = sch.split(k, [None, K_STEP])
    sch.reorder(*lead, jo, ko, ji, ki)
    sch.parallel(sch.fuse(*lead, jo) if lead else jo)
    sch.unroll(ki)
