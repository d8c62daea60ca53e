"""Schedule rules per target: an ordered list each, first rule that matches a kernel wins."""

from __future__ import annotations


def rules_for(target, records: dict | None = None) -> list:
    """The rule list for a tvm Target (llvm: effc's CPU rules; cuda: dlight's GPU rules)."""
    if target.kind.name == "llvm":
        from effc.codegen.schedules.cpu import default_rules

        return default_rules(records)
    if target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    raise ValueError(f"no schedule rules for target kind {target.kind.name}")
