"""Models and helpers shared by the fold-batchnorm tests: BN statistics that a wrong fold cannot
pass, torch exports with and without the exporter's own folding, and the fold / refuse checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx import helper, numpy_helper
from torch import nn

from effc.frontend.onnx import from_proto
from effc.frontend.torch import from_torch
from effc.ir import copy_model, op_counts, to_proto
from effc.passes.base import PassContext
from effc.passes.fold_batchnorm import FoldBatchNorm
from effc.verify import OrtRunner, deviation, make_inputs

TOLERANCE = FoldBatchNorm.tolerance


def randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                c = bn.num_features
                bn.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
                bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                bn.bias.copy_(torch.rand(c, generator=gen) * 2 - 1)
    return module.eval()


def export(module: nn.Module, *inputs: torch.Tensor) -> ir.Model:
    torch.manual_seed(0)
    return from_torch(randomise_bn(module), inputs)


def export_unoptimized(module: nn.Module, *inputs: torch.Tensor) -> ir.Model:
    """torch's exporter already folds Conv->BN and Gemm->BN when it optimises: keep them apart
    (only constants are folded, e.g. the zero bias it builds for a bias-free Conv)."""
    program = torch.onnx.export(randomise_bn(module), inputs, dynamo=True, optimize=False, opset_version=23,
                                verbose=False)
    onnxscript.optimizer.fold_constants(program.model)
    ir.passes.common.RemoveUnusedNodesPass()(program.model)
    proto = ir.serde.serialize_model(program.model)
    proto.ir_version = min(proto.ir_version, 10)
    return from_proto(proto)


def fold(model: ir.Model, rewrites: int, tolerance: float = TOLERANCE):
    """Run the pass on a copy, check the count, that no BN is left and ORT agreement."""
    folded = copy_model(model)
    outcome = FoldBatchNorm().run(folded, PassContext())
    assert len(outcome.rewrites) == rewrites, (outcome.rewrites, outcome.skipped)
    assert "BatchNormalization" not in op_counts(folded)
    onnx.checker.check_model(to_proto(folded))
    feeds = make_inputs(model, count=2, seed=1)
    dev = deviation(OrtRunner(folded).run_all(feeds), OrtRunner(model).run_all(feeds))
    assert dev.max_rel <= tolerance, dev
    return folded, outcome


def refuse(model: ir.Model, reason: str) -> None:
    """The pass makes no rewrite, says why, and leaves the model exactly as it was."""
    before = to_proto(model).SerializeToString()
    outcome = FoldBatchNorm().run(model, PassContext())
    assert outcome.rewrites == []
    assert len(outcome.skipped) == 1 and reason in outcome.skipped[0].reason, outcome.skipped
    assert to_proto(model).SerializeToString() == before


def bn_params(c: int, rng: np.random.Generator, dtype) -> list[onnx.TensorProto]:
    values = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.uniform(-1, 1, c),
              "mean": rng.uniform(-1, 1, c), "var": rng.uniform(0.05, 2, c)}
    return [numpy_helper.from_array(v.astype(dtype), n) for n, v in values.items()]


def onnx_model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto
