"""effc's CPU schedule rules, in priority order; the fallback closes the list so no kernel is left
unscheduled (an unscheduled kernel runs single-threaded and scalar)."""

from __future__ import annotations


def default_rules() -> list:
    from effc.codegen.schedules.cpu.fallback import Fallback
    from effc.codegen.schedules.cpu.matmul import Matmul

    return [Matmul(), Fallback()]
