"""Matrix-vector products (one row of activations: a decode step, a classifier head on the CLS
token): y[j] = sum_k x[k] * W[k, j] (W in either orientation) plus a fused epilogue.

TVM drops the unit row loop, so the matmul rule's S/I/J/K analysis finds no I and passes; left to
the fallback, gpt2's 50257-wide head at seq 1 ran ~10x slower than ONNX Runtime. Here a constant W
is pre-packed at compile time into the matmul rule's [n / nr, k, nr] panels (one contiguous stream
per panel, whatever W's orientation), and each panel is one parallel task: for each k, nr / lanes
vector FMAs with x[k] broadcast. Memory-bound: W is read once.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from effc.codegen.schedules.cpu.base import CPURule, extent, one_reduction
from effc.codegen.schedules.cpu.panels import (
    b_panel,
    inline_side_inputs,
    pack_panel,
    pick_nr,
    vectorize,
    weight_params,
    write_back_at,
)

NR_VECTORS = 8  # 8 independent FMA chains per task; the kernel streams W, so wide is cheap


class Gemv(CPURule):
    name = "gemv"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        found = one_reduction(sch, target)
        if found is None or found[0].dom_kind() != "SR":
            return None
        main, lanes = found[0].block_rv, found[1]
        weight = _weight_read(sch.get(main), func)
        if weight is None:
            return None
        inline_side_inputs(sch, main)
        j, k = sch.get_loops(main)
        n, kk = extent(sch, j), extent(sch, k)
        if n is None or kk is None or n < lanes:
            return None
        nr = pick_nr(n, lanes, NR_VECTORS)
        # The weight as [1, J, K] (a reindex copy; the panel packing expects a leading batch axis),
        # then padded to whole panels and blocked.
        b_copy = sch.reindex(main, ("read", weight))
        sch.transform_layout(b_copy, ("write", 0), lambda jj, kk_: (jj * 0, jj, kk_))
        padded = n % nr != 0
        if padded:
            sch.pad_einsum(main, [nr, 1])
        panel = b_panel(sch, main, b_copy, padded)
        j, k = sch.get_loops(main)
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(jo, k, ji)
        pack_panel(sch, func, panel, nr)
        write_back_at(sch, main, jo, nr, lanes)
        sch.set_scope(main, 0, "local")
        vectorize(sch, ji, lanes)
        sch.parallel(jo)
        sch.decompose_reduction(main, k)
        return sch


def _weight_read(block, func) -> int | None:
    """Index of the read that is a constant weight indexed by both loop variables (the other read,
    the activation row, must depend on the reduction variable only)."""
    weights = weight_params(func)
    spatial, reduce = (iv.var for iv in block.iter_vars)
    if len(block.reads) != 2:
        return None
    found = None
    for index, region in enumerate(block.reads):
        used = [r.min for r in region.region if isinstance(r.min, tirx.Var)]
        has = lambda v: any(u.same_as(v) for u in used)  # noqa: E731 (Var == builds an expression)
        if any(region.source.same_as(w) for w in weights) and has(spatial) and has(reduce):
            found = index
        elif has(spatial):
            return None  # the activation must be a row indexed by k alone
    return found
