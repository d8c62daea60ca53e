"""Row reductions: softmax, layer/RMS norm, mean - any kernel that is, per row, a few reductions
over the last axis followed by an elementwise pass over the same row.

One parallel loop over rows; under it each stage runs on one row while it is in L1: the
reductions with a vector of partial results (rfactor over ``lanes`` lanes, halved by vector adds
down to TREE_LEFT, then summed),
the elementwise stages vectorised. A stage read by several later stages (softmax's exp) is kept
as a one-row buffer rather than recomputed; a stage with one reader is inlined into it.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func

from effc.codegen.schedules.cpu.base import CPURule, extent, vector_lanes

TREE_LEFT = 4  # partials the final reduction still sums one by one


class RowReduction(CPURule):
    name = "reduction"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not any(b.is_reduction() for b in infos):
            return None
        if any(not (b.is_reduction() or b.is_injective()) for b in infos):
            return None
        _inline_single_use(sch)
        blocks = sch.get_child_blocks(get_root_block(sch))
        out = blocks[-1]
        if _is_reduction(sch, out):  # a bare reduction with no row pass (mean, a mask's row max)
            return _bare_rows(sch, blocks, out)
        loops = sch.get_loops(out)
        rows = [extent(sch, lp) for lp in loops[:-1]]
        if not rows or None in rows or extent(sch, loops[-1]) is None:
            return None
        for block in blocks[:-1]:  # every stage must be "rows x (one axis)", or one value per row
            blk_loops = sch.get_loops(block)
            if [extent(sch, lp) for lp in blk_loops[:len(rows)]] != rows or len(blk_loops) > len(rows) + 1:
                return None
            if any(iv.iter_type != 0 for iv in sch.get(block).iter_vars[:len(rows)]):  # 0: data-parallel
                return None
        lanes = vector_lanes(str(sch.get(out).writes[0].source.dtype), target)
        if lanes == vector_lanes("float32", target) and extent(sch, loops[-1]) % (2 * lanes) == 0:
            # two vectors of partial sums: two independent add chains, and an fp32 row pass of two
            # vectors per step (a layer norm over 768: 119 -> 34 us per 128 rows on znver4; a bf16
            # output has these lanes already)
            lanes *= 2
        # rfactor must run while each reduction still has its own loop nest, before compute_at.
        stages = []
        for block in blocks[:-1]:
            partial = _rfactor_lanes(sch, block, lanes) if _is_reduction(sch, block) else None
            if partial is None:
                stages.append((block, None))
                continue
            stages.append((partial, "partial"))
            width = lanes
            while width > TREE_LEFT:  # halve the partials with vector adds before the scalar sum
                width //= 2
                stages.append((_halve(sch, block, width), width))
            stages.append((block, "final"))
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(row)
        _vectorize_inner(sch, out, lanes)
        for block, _ in reversed(stages):
            sch.compute_at(block, row, preserve_unit_loops=True)
        for block, role in stages:
            if role == "partial":
                _vectorize_partial(sch, block, lanes)
            elif isinstance(role, int):  # a halving stage of ``role`` lanes
                _vectorize_half(sch, block, role)
            elif role == "final":
                continue  # `lanes` scalar steps; its init stays inline
            elif _is_reduction(sch, block):  # a row not split into lanes: scalar loop
                sch.decompose_reduction(block, sch.get_loops(block)[1])
            else:
                _vectorize_inner(sch, block, lanes)
        return sch


def _bare_rows(sch, blocks, out):
    """A reduction whose per-row results are the output: rows in parallel, each reduced in one
    serial pass over its (contiguous, innermost) axes. None unless every producer was inlined and
    the reduction axes are innermost."""
    if len(blocks) != 1:
        return None
    loops = sch.get_loops(out)
    kinds = [iv.iter_type for iv in sch.get(out).iter_vars]  # 0: spatial, 2: reduction
    rows = kinds.index(2)
    if rows == 0 or any(k != 2 for k in kinds[rows:]) or len(loops) != len(kinds):
        return None
    row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
    sch.parallel(row)
    sch.decompose_reduction(out, sch.get_loops(out)[1])
    return sch


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == 2 for iv in sch.get(block).iter_vars)  # 2: CommReduce


def _inline_single_use(sch) -> None:
    """Inline every elementwise stage that has at most one reader (casts, x*x before a sum, the
    row statistic into the output); keep those read twice (softmax's exp) as buffers."""
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(get_root_block(sch))[:-1]:
            if _is_reduction(sch, block) or len(sch.get_consumers(block)) > 1:
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # not inlinable (e.g. an output): it stays a stage
                continue
            changed = True
            break


def _vectorize_inner(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) < 2:  # a per-row value (layer norm's mean): nothing below the row loop
        return
    inner = loops[-1]
    ext = extent(sch, inner)
    if ext is not None and ext >= lanes and ext % lanes == 0:
        sch.vectorize(sch.split(inner, [None, lanes])[1])


def _rfactor_lanes(sch, block, lanes: int):
    """Split the row reduction into ``lanes`` partial results (a block whose lane loop is spatial,
    so it vectorises) and a final reduction of those; None when the row length is not a multiple of
    ``lanes`` (the loop stays scalar: TVM would scalarise a predicated vector loop anyway)."""
    inner = sch.get_loops(block)[-1]
    ext = extent(sch, inner)
    if ext is None or ext < 2 * lanes or ext % lanes:
        return None
    _, lane = sch.split(inner, [None, lanes])
    return sch.rfactor(lane, 0)


def _halve(sch, final, half: int):
    """The final reduction sums 2 * half partials one by one (dependent scalar adds: 32 of them per
    statistic made a layer norm row wait ~100 cycles per statistic); rfactor its loop into a stage of
    ``half`` sums of two, a vector add, after which the final sums ``half``."""
    loop = sch.get_loops(final)[-1]
    _, low = sch.split(loop, [2, half])
    return sch.rfactor(low, 0)


def _vectorize_half(sch, stage, half: int) -> None:
    """Under the row loop a halving stage runs over (its ``half`` lanes, the 2 halves, the row's unit
    loop): the halves outer, the lanes vectorised (half >= TREE_LEFT > 2, so the extents differ)."""
    loops = sch.get_loops(stage)
    lane = [lp for lp in loops if extent(sch, lp) == half][-1]
    pair = [lp for lp in loops if extent(sch, lp) == 2][-1]
    sch.reorder(pair, lane)
    sch.vectorize(lane)
    init = sch.decompose_reduction(stage, pair)
    sch.vectorize(sch.get_loops(init)[-1])


def _vectorize_partial(sch, partial, lanes: int) -> None:
    """Under the row loop the partial block runs (k outer, lane inner): vectorise the lane loop of
    the update and of its initialisation."""
    ko, ki = sch.get_loops(partial)[-2:]
    if extent(sch, ki) != lanes:
        ko, ki = ki, ko
        sch.reorder(ko, ki)
    sch.vectorize(ki)  # before decompose_reduction: vectorize needs the block to keep its init
    init = sch.decompose_reduction(partial, ko)
    sch.vectorize(sch.get_loops(init)[-1])
