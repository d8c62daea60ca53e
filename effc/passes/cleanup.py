"""Graph tidying after a rewrite, reusing onnx_ir's own passes (dead code, identities, CSE)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common


def cleanup(model: ir.Model) -> None:
    """Remove what a rewrite left behind; never changes what the model computes."""
    for p in (common.IdentityEliminationPass(), common.CommonSubexpressionEliminationPass(),
              common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()):
        p(model)
