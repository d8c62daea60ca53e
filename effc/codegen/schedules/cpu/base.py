"""Shared pieces of the CPU rules: the rule base class and small loop helpers."""

from __future__ import annotations

from typing import ClassVar

from tvm import tirx
from tvm.s_tir.dlight.base import ScheduleRule

from effc.codegen.records import knobs_for
from effc.codegen.target import vector_bytes


class CPURule(ScheduleRule):
    """A rule that only applies to llvm targets."""

    name = "cpu-rule"

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"


class RegisterTileRule(CPURule):
    """A matmul rule with one fixed mr x nr_vectors register tile (whatever the target) that tuning
    records override per kernel: the bf16 and int8 rules."""

    KNOBS: ClassVar[dict] = {"mr": (4, 6, 8, 12), "nr_vectors": (1, 2, 3, 4)}  # the tuner's search space

    def __init__(self, mr: int = 6, nr_vectors: int = 4, records: dict | None = None):
        self.mr, self.nr_vectors, self.records = mr, nr_vectors, records

    def default_knobs(self, target=None) -> dict:
        return {"mr": self.mr, "nr_vectors": self.nr_vectors}

    def recorded(self, func, target) -> dict:
        """Tuned knobs recorded for this kernel, or {} (the build counts kernels that had some)."""
        return knobs_for(self.records, self.name, func, target)


def extent(sch, loop) -> int | None:
    """A loop's constant extent, or None when it is symbolic."""
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def vector_lanes(dtype: str, target=None) -> int:
    """Elements of ``dtype`` in one SIMD register of ``target`` (None: the current target)."""
    import tvm

    return max(1, vector_bytes(target) * 8 // tvm.DataType(dtype).bits)


def row_vector_width(width: int, lanes: int) -> int:
    """Output pixels per vector: a whole vector when it divides the row; else the whole row when it
    is at most a few vectors (LLVM splits it into full vectors and one masked one); else half or a
    quarter vector when it divides the row; else full vectors with a masked last one."""
    if width % lanes == 0:
        return lanes
    if width <= 8 * lanes:
        return width
    for vec in (lanes // 2, lanes // 4):
        if vec >= 4 and width % vec == 0:
            return vec
    return lanes


def parallel_outer(sch, loops: list, min_extent: int = 2) -> None:
    """Fuse ``loops`` (outermost first) and run them in parallel, if there is work to share."""
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = extent(sch, fused)
    if ext is None or ext >= min_extent:
        sch.parallel(fused)


FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def single_reduction(sch):
    """Normalise ``sch``'s kernel; its single reduction block (dlight's BlockInfo) when every other
    block is elementwise, else None."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    blocks = normalize_prim_func(sch)
    if blocks is None:
        return None
    reductions = [b for b in blocks if b.is_reduction()]
    if len(reductions) != 1 or not all(b.is_injective() for b in blocks if not b.is_reduction()):
        return None
    return reductions[0]


def one_reduction(sch, target=None):
    """(``sch``'s single reduction block, the vector lanes of its float output dtype on ``target``)
    when every other block is elementwise, else None. The float matmul-shaped rules start here."""
    reduction = single_reduction(sch)
    if reduction is None:
        return None
    dtype = str(sch.get(reduction.block_rv).writes[0].source.dtype)
    return (reduction, vector_lanes(dtype, target)) if dtype in FLOAT_DTYPES else None


def fold_epilogue(sch, main) -> list:
    """Inline every intermediate epilogue block (C copy, bias add, GELU, ...) into its consumers and
    return the blocks left reading the matmul result (normally one: the output writer).

    compute_inline (producer into consumer) rather than reverse_compute_inline: the latter, in this
    TVM, rewrites only one of several reads of the same buffer (GELU reads x twice) and leaves a
    dangling buffer behind.
    """
    changed = True
    while changed:
        changed = False
        for block in descendants(sch, main):
            try:
                sch.compute_inline(block)
            except Exception:  # an output block: it stays and becomes the write-back
                continue
            changed = True
            break
    return list(sch.get_consumers(main))


def reachable(sch, block, step) -> list:
    """Every block reachable from ``block`` by repeating ``step`` (get_producers or get_consumers)."""
    out, todo = [], list(step(block))
    while todo:
        b = todo.pop()
        out.append(b)
        todo.extend(step(b))
    return out


def ancestors(sch, block) -> list:
    return reachable(sch, block, sch.get_producers)


def descendants(sch, block) -> list:
    return reachable(sch, block, sch.get_consumers)
