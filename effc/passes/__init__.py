"""Pass registry: kebab-case name -> Pass class."""

from __future__ import annotations

from effc.errors import EffcError
from effc.passes.base import Pass, PassContext, PassOutcome, Skip
from effc.passes.fold_batchnorm import FoldBatchNorm  # noqa: E402
from effc.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from effc.passes.shift_add import ShiftAdd

REGISTRY: dict[str, type[Pass]] = {p.name: p for p in (FoldBatchNorm, LayerNormToRMSNorm, ShiftAdd)}

# What `effc compile` runs when --passes is not given: the exact passes (lossy ones only on request).
DEFAULT_PASSES = ("fold-batchnorm", "layernorm-to-rmsnorm")


def get_pass(name: str) -> Pass:
    try:
        return REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise EffcError(f"unknown pass '{name}' (known: {known})") from None


def parse_pass_list(text: str | None) -> list[Pass]:
    """Pass objects for a comma-separated list; None means the defaults, "none" means no pass."""
    if text is not None and text.strip().lower() == "none":
        return []
    names = DEFAULT_PASSES if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EffcError("--passes is empty (use --passes none to run no pass)")
    return [get_pass(n) for n in names]


__all__ = ["Pass", "PassContext", "PassOutcome", "Skip", "REGISTRY", "DEFAULT_PASSES", "get_pass", "parse_pass_list"]
