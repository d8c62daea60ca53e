"""Dense and batched matmul (C[s, i, j] = sum_k A[s, i, k] * B[s, k, j]) plus fused epilogues.

The kernel is normalised to [batch, i, j, k] loops, then tiled into an ``mr x nr`` register block:
for each (batch, j-panel) in parallel, for each i-tile, the k loop accumulates an mr x nr tile of C
held in registers (i unrolled, j vectorised over AVX-512 lanes), and the epilogue (bias, GELU,
residual add, scale: whatever FuseOps put after the matmul) is applied when the tile is written back.
Knobs: mr (rows per tile), nr_vectors (j width in vector registers). k is not blocked yet: with the
weight pre-packed, one j-panel of B is a contiguous stream that stays in L2 across the i tiles.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.gpu.matmul import get_index_map

from effc.codegen.schedules.cpu.base import CPURule, extent, vector_lanes


class Matmul(CPURule):
    name = "matmul"

    def __init__(self, mr: int = 8, nr_vectors: int = 2):
        self.mr, self.nr_vectors = mr, nr_vectors

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None:
            return None
        reductions = [b for b in blocks if b.is_reduction()]
        if len(reductions) != 1 or not all(b.is_injective() for b in blocks if not b.is_reduction()):
            return None
        main = reductions[0].block_rv
        if not _plain_access(sch.get(main)) or get_index_map(sch.get(main)) is None:
            return None
        dtype = str(sch.get(main).writes[0].source.dtype)
        if dtype not in ("float32", "float16", "bfloat16"):
            return None
        lanes = vector_lanes(dtype)

        # Normalise to C[S, I, J] += A[S, I, K] * B[S, J, K]; the reindex copies are inlined back
        # below, so the kernel still reads A and B in their original layouts.
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
        if m is None or n is None or kk is None or n < lanes:
            return None
        nr = _pick_nr(n, lanes, self.nr_vectors)
        if nr is None:
            return None
        mr = min(self.mr, m)

        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(batch, jo, io, k, ii, ji)
        for copy in (a_copy, b_copy):
            sch.compute_inline(copy)
        _prepack_weight(sch, func, main, nr)
        # The epilogue becomes the tile write-back: it runs right after each tile's k loop, while
        # the accumulator shrinks to one mr x nr register tile.
        for block in _fold_epilogue(sch, main):
            sch.reverse_compute_at(block, io, preserve_unit_loops=True)
            last = sch.get_loops(block)[-1]
            if extent(sch, last) == nr:
                sch.vectorize(last)
        sch.set_scope(main, 0, "local")
        sch.unroll(ii)
        sch.vectorize(ji)
        sch.parallel(sch.fuse(batch, jo))
        sch.decompose_reduction(main, k)
        return sch


def _plain_access(stmt) -> bool:
    """Every index of every access is a bare loop variable (or a constant): a true (batched) matmul.
    A convolution also fits the S/I/J/K pattern (A[n, c, h*16 + ry, ...]) but its im2col
    normalisation produced wrong results here, so it is left to the fallback for now."""
    from tvm import tirx

    for region in list(stmt.reads) + list(stmt.writes):
        for r in region.region:
            if not isinstance(r.min, (tirx.Var, tirx.IntImm)):
                return False
    return True


def _prepack_weight(sch, func, main, nr: int) -> bool:
    """Give a constant weight B the blocked layout [n / nr, k, nr], so one j-panel is a contiguous
    stream instead of k rows a full row-stride apart. The packing block is marked as a layout
    rewrite, which the build splits out and runs once at compile time (never per inference)."""
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return False
    weights = [func.params[int(i)] for i in free]  # TVM 0.27: a PrimFunc param is its buffer
    stmt = sch.get(main)
    k_var, j_var = stmt.iter_vars[3].var, stmt.iter_vars[2].var
    for index, region in enumerate(stmt.reads):
        if not any(region.source.same_as(w) for w in weights) or len(region.region) != 2:
            continue
        first, second = (r.min for r in region.region)
        if first.same_as(k_var) and second.same_as(j_var):
            layout = lambda k, j: (j // nr, k, j % nr)  # noqa: E731  B[k, n]
        elif first.same_as(j_var) and second.same_as(k_var):
            layout = lambda j, k: (j // nr, k, j % nr)  # noqa: E731  B[n, k] (transposed weight)
        else:
            return False
        pack = sch.cache_read(main, index, "global")
        sch.transform_layout(pack, ("write", 0), layout)
        sch.annotate(pack, "meta_schedule.layout_rewrite_preproc", True)
        return True
    return False


def _pick_nr(n: int, lanes: int, nr_vectors: int) -> int | None:
    """Widest j tile of at most ``nr_vectors`` vectors that divides n (no ragged vector tail)."""
    for vectors in range(nr_vectors, 0, -1):
        if n % (vectors * lanes) == 0:
            return vectors * lanes
    return None


def _fold_epilogue(sch, main) -> list:
    """Inline every intermediate epilogue block (C copy, bias add, GELU, ...) into its consumers and
    return the blocks left reading the matmul result (normally one: the output writer).

    compute_inline (producer into consumer) rather than reverse_compute_inline: the latter, in this
    TVM, rewrites only one of several reads of the same buffer (GELU reads x twice) and leaves a
    dangling buffer behind.
    """
    changed = True
    while changed:
        changed = False
        for block in _descendants(sch, main):
            try:
                sch.compute_inline(block)
            except Exception:  # an output block: it stays and becomes the write-back
                continue
            changed = True
            break
    return list(sch.get_consumers(main))


def _descendants(sch, block) -> list:
    out, todo = [], list(sch.get_consumers(block))
    while todo:
        b = todo.pop()
        out.append(b)
        todo.extend(sch.get_consumers(b))
    return out
