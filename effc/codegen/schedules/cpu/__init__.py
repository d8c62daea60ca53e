"""effc's CPU schedule rules, in priority order; the fallback closes the list so no kernel is left
unscheduled (an unscheduled kernel runs single-threaded and scalar)."""

from __future__ import annotations


def default_rules(records: dict | None = None) -> list:
    """``records``: tuned knobs (effc.codegen.records); rules fall back to their defaults."""
    from effc.codegen.schedules.cpu.fallback import Elementwise, Fallback
    from effc.codegen.schedules.cpu.gemv import Gemv
    from effc.codegen.schedules.cpu.im2col import Im2col
    from effc.codegen.schedules.cpu.int8_matmul import Int8Matmul
    from effc.codegen.schedules.cpu.matmul import Matmul
    from effc.codegen.schedules.cpu.matmul_bf16 import MatmulBf16
    from effc.codegen.schedules.cpu.reduction import RowReduction
    from effc.codegen.schedules.cpu.softmax import Softmax
    from effc.codegen.schedules.cpu.window import Window

    return [Int8Matmul(records=records), MatmulBf16(records=records), Matmul(records=records), Gemv(), Im2col(),
            Window(), Softmax(), RowReduction(), Elementwise(), Fallback()]
