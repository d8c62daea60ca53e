"""Graph tidying after a rewrite: constant folding (onnxscript) and onnx_ir's own passes
(identities, common subexpressions, dead nodes, unused functions and opsets)."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes import common


def cleanup(model: ir.Model) -> None:
    """Remove what a rewrite left behind; never changes what the model computes."""
    from onnxscript.optimizer import fold_constants

    quiet = logging.getLogger("onnxscript")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # folding narrates every constant it declines to evaluate
    try:
        fold_constants(model)
    finally:
        quiet.setLevel(level)
    for p in (common.IdentityEliminationPass(), common.CommonSubexpressionEliminationPass(),
              common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
        p(model)
