"""Dense and batched matmul (C[s, i, j] = sum_k A[s, i, k] * B[s, k, j]) plus fused epilogues.

The kernel is normalised to [batch, i, j, k] loops, then tiled into an ``mr x nr`` register block:
for each (batch, j-panel) in parallel, for each i-tile, the k loop accumulates an mr x nr tile of C
held in registers (i unrolled, j vectorised over the target's vector lanes), and the epilogue (bias, GELU,
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

from tvm import s_tir

from effc.codegen.peel_tail import FULL_PANELS_KEY, PEEL_KEY
from effc.codegen.records import knobs_for
from effc.codegen.schedules.cpu.base import CPURule, one_reduction
from effc.codegen.schedules.cpu.panels import (
    b_panel,
    matmul_gemm,
    pack_panel,
    pick_nr,
    vectorize,
    write_back_at,
)
from effc.codegen.target import vector_registers
MAX_MR = 16  # rows of a tile: each is one broadcast per k step
PREFETCH_KEY = "effc.prefetch_panel_nr"  # on the k loop: the panel width, for effc.codegen.prefetch


class Matmul(CPURule):
    name = "matmul"

    KNOBS: ClassVar[dict] = {"mr": (4, 6, 8, 12, 16), "nr_vectors": (1, 2, 3, 4)}  # the tuner's search space

    def __init__(self, mr: int | None = None, nr_vectors: int | None = None, records: dict | None = None):
        """``mr``/``nr_vectors``: fixed knobs instead of the target's defaults; ``records``: tuned
        knobs per workload (effc.codegen.records), which win over both. Nothing here changes
        after construction: one rule object may schedule for several targets and builds."""
        self.fixed = {k: v for k, v in (("mr", mr), ("nr_vectors", nr_vectors)) if v is not None}
        self.records = records

    @staticmethod
    def default_knobs(target=None) -> dict:
        """An mr x nr_vectors tile of accumulators that leaves registers for B's vectors and A's
        broadcast: 8 x 2 of AVX-512's 32 registers, 6 x 2 of AVX2's (or SSE's) 16. The tile's
        width in columns, nr_vectors x lanes, follows the target's vector width."""
        return {"mr": 8 if vector_registers(target) >= 32 else 6, "nr_vectors": 2}

    def recorded(self, func, target) -> dict:
        """The tuned knobs recorded for this kernel on ``target``, or {} (the build counts the
        kernels that had some)."""
        return knobs_for(self.records, self.name, func, target)

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        knobs = {**self.default_knobs(target), **self.fixed, **self.recorded(func, target)}
        return self.schedule(func, target=target, **knobs)

    def schedule(self, func, mr: int, nr_vectors: int, target=None):
        """``func`` tiled mr x nr_vectors for ``target`` (None: the current target), or None."""
        sch = s_tir.Schedule(func)
        found = one_reduction(sch, target)
        if found is None:
            return None
        main, lanes = found[0].block_rv, found[1]
        # Normalise to C[S, I, J] += A[S, I, K] * B[S, J, K]. A's reindex copy is inlined back
        # below (the kernel reads A in place); B's copy becomes the [n / nr, k, nr] panel.
        gemm = matmul_gemm(sch, main)
        if gemm is None:
            return None
        a_copy, b_copy, c_copy, c_map, (batch, i, j, k), (m, n, kk) = gemm
        nr = pick_nr(n, lanes, nr_vectors)
        padded = n % nr != 0
        if padded:
            # Ragged n (gpt2's 50257-wide LM head, 197-token attention): compute a zero-padded
            # n_pad = ceil(n / nr) * nr wide result so every tile is a full vector tile; the B
            # panel is zero-padded and only the write-back is trimmed to n.
            sch.pad_einsum(main, [1, 1, nr, 1])
        mr = _pick_mr(mr, m, nr_vectors, nr, lanes)

        sch.compute_inline(a_copy)
        in_place = not padded and _reads_in_place(sch, b_copy)
        panel = None if in_place else b_panel(sch, main, b_copy, padded)
        batch, i, j, k = sch.get_loops(main)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(batch, jo, io, k, ii, ji)
        if panel is not None:
            pack_panel(sch, func, panel, nr)
        # The epilogue becomes the tile write-back: it runs right after each tile's k loop, while
        # the accumulator shrinks to one mr x nr register tile.
        if not write_back_at(sch, main, io, nr, lanes, c_map, mr):
            return None
        sch.set_scope(main, 0, "local")
        sch.unroll(ii)
        vectorize(sch, ji, lanes)
        outer = sch.fuse(batch, jo)
        sch.parallel(outer)
        if padded:  # full panels without column checks (effc.codegen.peel_tail.full_panel_pass)
            sch.annotate(outer, FULL_PANELS_KEY, -(-n // nr))
        sch.decompose_reduction(main, k)
        if panel is not None:
            sch.annotate(k, PREFETCH_KEY, nr)  # effc.codegen.prefetch streams the next panel in
        if m % mr:
            sch.annotate(io, PEEL_KEY, True)  # full tiles without row checks (effc.codegen.peel_tail)
        return sch


def _reads_in_place(sch, b_copy) -> bool:
    """B is conv_gemm's flat gather (IN_PLACE): its rows are contiguous slices of the padded input,
    so the kernel reads them in place, vector by vector, instead of packing panels per call. Then
    the gather and B's copy are inlined into the matmul."""
    from effc.codegen.conv_gemm import IN_PLACE

    producers = sch.get_producers(b_copy)
    if len(producers) != 1 or IN_PLACE not in sch.get(producers[0]).annotations:
        return False
    sch.compute_inline(producers[0])
    sch.compute_inline(b_copy)
    return True


def _pick_mr(mr: int, m: int, nr_vectors: int, nr: int, lanes: int) -> int:
    """Rows per tile: the knob, scaled up when n forced a narrower tile than ``nr_vectors``, so
    the tile keeps its count of accumulators (independent FMA chains); at most m."""
    return min(m, MAX_MR, mr * max(1, nr_vectors * lanes // nr))
