"""Fallback: any kernel no other rule took gets parallel outer loops and a vectorised inner loop.

Not fast, but never the single-threaded scalar loop nest TVM leaves unscheduled kernels as.
Elementwise, the same schedule restricted to kernels without a reduction (elementwise math,
transposes, reshapes, gathers), names the kernels for which it is the right one: they move memory
once, in parallel and in vectors, so only what lands on `fallback` itself lacks a rule.
Injective blocks are inlined first (fewer passes over memory); every remaining block then has its
spatial loops moved outside its reduction loops, the outer spatial loops fused and run in parallel,
and for purely spatial blocks the innermost loop vectorised when it splits evenly into vector lanes.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from effc.codegen.schedules.cpu.base import CPURule, extent, parallel_outer, vector_lanes


class Fallback(CPURule):
    name = "fallback"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None:
            return None
        blocks = _inline(sch, blocks)
        reductions = []
        for info in blocks:
            block, kinds = info.block_rv, info.dom_kind()
            loops = sch.get_loops(block)
            if len(loops) != len(kinds) or any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
                continue  # already scheduled or opaque structure: leave it alone
            s_loops = [lp for lp, k in zip(loops, kinds) if k == "S"]
            r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
            if "O" in kinds:
                # Opaque iterators (scans, data-dependent writes) may not be reordered; only the
                # spatial loops already outside them can be shared between cores.
                lead = []
                for lp, k in zip(loops, kinds):
                    if k != "S":
                        break
                    lead.append(lp)
                parallel_outer(sch, lead)
                continue
            if r_loops:
                sch.reorder(*s_loops, *r_loops)
                parallel_outer(sch, s_loops)
                reductions.append((block, r_loops[0]))
                continue
            if not s_loops:
                continue
            lanes = vector_lanes(_write_dtype(sch, block), target)
            inner = extent(sch, s_loops[-1])
            if inner is not None and inner >= lanes and inner % lanes == 0:
                outer, vec = sch.split(s_loops[-1], [None, lanes])
                sch.vectorize(vec)
                s_loops = s_loops[:-1] + [outer]
            elif inner is not None and inner >= lanes and len(s_loops) > 1 and _strided_rows(sch.get(block), inner):
                # rows read at another row pitch (a padding, a crop: conv_gemm's conv_pad and junk
                # columns) stay loops of their own, for LLVM to vectorise, instead of one fused loop
                # that splits every index by div/mod (5 to 25x slower)
                s_loops = s_loops[:-1]
            parallel_outer(sch, s_loops)
        for block, r_loop in reductions:
            sch.decompose_reduction(block, r_loop)
        return sch


def _inline(sch, blocks: list) -> list:
    """Inline what can be (producers into consumers first), and return the blocks left.

    dlight's try_inline, except that nothing is reverse-inlined into a block with an init: after
    normalisation drops a unit reduction loop (a matmul over k = 1), that block looks spatial, and
    TVM then folds the epilogue into both its init and its update (a residual added twice)."""
    def trial(inline, allowed) -> int | None:
        for i, info in enumerate(blocks):
            if not allowed(info.block_rv):
                continue
            try:
                inline(info.block_rv)
            except Exception:  # noqa: BLE001 (TVM's ScheduleError: this block stays)
                continue
            return i
        return None

    def into_plain_producers(block) -> bool:
        return all(sch.get(p).init is None for p in sch.get_producers(block))

    while True:
        i = trial(sch.compute_inline, lambda b: True)
        if i is None:
            i = trial(sch.reverse_compute_inline, into_plain_producers)
        if i is None:
            return blocks
        blocks.pop(i)


def _strided_rows(block, inner: int) -> bool:
    """Whether ``block`` pads (an if_then_else) or reads rows at another pitch than its ``inner``
    extent: an index of a last axis that is the innermost iterator (plus a constant) of a longer
    axis, or row * pitch + it.
    A fused loop would locate those by div/mod per element. (A reshape reads row * inner + it:
    fused, that cancels.)"""
    if "if_then_else" in str(block.body):  # a padding (bounds tests): its row is the inner loop
        return True
    if not block.iter_vars:
        return False
    var = block.iter_vars[-1].var
    for region in block.reads:
        if not region.region:  # a 0-d read (a scalar: the bound of a where)
            continue
        index = region.region[-1].min
        if isinstance(index, (tirx.Add, tirx.Sub)) and isinstance(index.b, tirx.IntImm):
            index = index.a
        pitch = None
        if isinstance(index, tirx.Var) and index.same_as(var):
            pitch = region.source.shape[-1]
        elif isinstance(index, tirx.Add) and index.b.same_as(var) and isinstance(index.a, tirx.Mul):
            pitch = index.a.b
        if isinstance(pitch, tirx.IntImm) and int(pitch) != inner:
            return True
    return False


def _write_dtype(sch, block) -> str:
    writes = sch.get(block).writes
    return str(writes[0].source.dtype) if writes else "float32"


class Elementwise(Fallback):
    """Kernels made only of spatial (injective) blocks; see the module docstring."""

    name = "elementwise"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target) or not _all_spatial(func):
            return None
        return super().apply(func, target, tunable)


def _all_spatial(func) -> bool:
    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    return blocks is not None and all(set(b.dom_kind()) <= {"S"} and sch.get(b.block_rv).init is None
                                      for b in blocks)
