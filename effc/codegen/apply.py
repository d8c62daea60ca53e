"""Apply an ordered rule list to every kernel, recording which rule took which kernel.

dlight's ApplyDefaultSchedule does the same but keeps no record; effc needs one so that a kernel no
rule took ("unscheduled": it runs as TVM's single-threaded scalar loop nest) and a rule that broke
on a kernel are visible in the build manifest and in `effc bench --profile`.
"""

from __future__ import annotations

import os

from effc.outdir import interrupted

UNSCHEDULED = "unscheduled"


class RuleLog:
    """What the rules did: kernel name -> rule label, hit counts, errors (rule: message), and the
    kernels scheduled with tuned knobs from a record. Kept here, per build, so that the rules
    themselves hold no state."""

    def __init__(self):
        self.kernels: dict[str, str] = {}
        self.hits: dict[str, int] = {}
        self.errors: list[str] = []
        self.tuned: list[str] = []

    def record(self, kernel: str, label: str) -> None:
        self.kernels[kernel] = label
        self.hits[label] = self.hits.get(label, 0) + 1


def label_of(rule) -> str:
    return getattr(rule, "name", type(rule).__name__)


def apply_rules(rules: list, log: RuleLog):
    """A module pass: first rule that returns a schedule wins; a rule that raises passes the kernel
    down the list (EFFC_DEBUG=1 re-raises instead)."""
    from tvm import s_tir, tirx
    from tvm.ir.transform import module_pass
    from tvm.target import Target

    @module_pass(opt_level=0, name="EffcApplyRules")
    def _pass(mod, _ctx):
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if is_scheduled(func):  # hand-written kernels (effc/kernels) name their own label
                if func.attrs.get("effc.rule") is not None:
                    log.record(gv.name_hint, str(func.attrs["effc.rule"]))
                continue
            target = func.attrs.get("target") if func.attrs is not None else None
            target = target or Target.current(allow_none=False)
            label, sch = UNSCHEDULED, None
            for rule in rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception as exc:
                    if interrupted():  # TVM hands a Ctrl-C back as a RuntimeError: not the rule's failure
                        raise KeyboardInterrupt("interrupted") from None
                    if os.environ.get("EFFC_DEBUG"):
                        raise
                    log.hits[f"{label_of(rule)}:error"] = log.hits.get(f"{label_of(rule)}:error", 0) + 1
                    log.errors.append(f"{gv.name_hint}: {label_of(rule)}: {_short(exc)}")
                    sch = None
                if isinstance(sch, list):
                    sch = sch[0] if sch else None
                if sch is not None:
                    label = label_of(rule)
                    if hasattr(rule, "recorded") and rule.recorded(func, target):
                        log.tuned.append(gv.name_hint)
                    break
            log.record(gv.name_hint, label)
            if isinstance(sch, s_tir.Schedule):
                updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _pass


def is_scheduled(func) -> bool:
    """A kernel marked as already scheduled (hand-written: effc/kernels); the rules leave it alone."""
    return func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1


def _short(exc: Exception) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1][:160]}" if lines else type(exc).__name__


def kernel_rule(kernels: dict[str, str], symbol: str) -> str | None:
    """The rule of a built kernel: the build renames a split kernel NAME into NAME_prepacked (the
    compute) and NAME_weight_prepack (run at compile time)."""
    for suffix in ("", "_prepacked", "_weight_prepack"):
        base = symbol[: len(symbol) - len(suffix)]
        if symbol.endswith(suffix) and base in kernels:
            return kernels[base]
    return None
