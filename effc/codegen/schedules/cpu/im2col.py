"""The im2col gather of a convolution (effc.codegen.conv_gemm): col[n, (g,) k, p] from the input.

Its flat k (channel, taps) and p (output row, column) loops make every element pay divisions and
a bound check, and the fallback vectorises p only when it is a multiple of 16. Split back into
(channel, *taps) and (*rows, column) loops, the divisions fold away: one parallel loop over
(image, channel) planes, and each tap copies one output row from one input row, vectorised over
the columns (a stride-1 row is a contiguous load; the padding a select). Producers fused into the
kernel (the previous layer's ReLU, a reshape) are inlined into the gather.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import get_root_block

from effc.codegen.conv_gemm import IM2COL
from effc.codegen.schedules.cpu.base import CPURule, extent, row_vector_width, vector_lanes


MATERIALIZE = "effc.im2col_materialize"  # a block before the gather computed once (an int8 conv's padded input)
FEW_PLANES = 8  # fewer (image, channel) planes than this: rows run in parallel too


class Im2col(CPURule):
    name = "im2col"

    def apply(self, func, target, tunable):
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        gather = blocks[-1] if blocks else None
        if gather is None or IM2COL not in sch.get(gather).annotations:
            return None
        geometry = [int(v) for v in sch.get(gather).annotations[IM2COL]]  # channels per group, *kernel, *out
        for block in blocks[:-1]:  # what the fused kernel computes before the gather (a ReLU)
            if _quantizes(sch, block) or MATERIALIZE in sch.get(block).annotations:
                _materialize(sch, block, target)
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # not elementwise: left to the fallback
                return None
        dims = (len(geometry) - 1) // 2
        cg, kernel, out = geometry[0], geometry[1:1 + dims], geometry[1 + dims:]
        *lead, k, p = sch.get_loops(gather)
        if extent(sch, k) != cg * _prod(kernel) or extent(sch, p) != _prod(out):
            return None
        c, *taps = sch.split(k, [cg, *kernel])
        *rows, col = sch.split(p, out)
        sch.reorder(*lead, c, *rows, *taps, col)
        plane = sch.fuse(*lead, c)
        if (extent(sch, plane) or 0) < FEW_PLANES and rows:  # an RGB stem: its output rows shared out too
            plane = sch.fuse(plane, rows[0])
        lanes = vector_lanes(str(sch.get(gather).writes[0].source.dtype), target)
        width = row_vector_width(out[-1], lanes)
        if width != out[-1]:
            _, col = sch.split(col, [None, width])
        sch.vectorize(col)
        sch.parallel(plane)
        return sch


def _quantizes(sch, block) -> bool:
    """A float -> 8-bit block (a QDQ stem's input QuantizeLinear): inlined, the gather would round
    every input byte once per tap that reads it (49 times for a 7 x 7 kernel)."""
    stmt = sch.get(block)
    return str(stmt.writes[0].source.dtype) in ("uint8", "int8") and \
        any(str(r.source.dtype).startswith("float") for r in stmt.reads)


def _materialize(sch, block, target) -> None:
    """``block`` computed once before the gather: parallel over its outer loops, its rows vectorised."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    lanes = vector_lanes(str(sch.get(block).writes[0].source.dtype), target)
    width = extent(sch, loops[-1]) or 1
    vector = row_vector_width(width, lanes)
    if vector != width:
        _, inner = sch.split(loops[-1], [None, vector])
        sch.vectorize(inner)
    else:
        sch.vectorize(loops[-1])


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
