"""The pass runner: records, rollback of exact passes that deviate, untouched models on skips."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import numpy_helper

from effc.frontend.onnx import from_proto
from effc.ir import const_value, op_counts, replace_input
from effc.passes.base import Pass, PassOutcome, Rewrite
from effc.pipeline import run_pipeline
from tests.helpers import tiny_mlp_proto


class ScaleWeight(Pass):
    """Multiplies W2 by ``factor``: exact only when factor == 1 (tests the tolerance)."""

    name, summary, exact = "scale-weight", "test pass", True

    def __init__(self, factor: float):
        self.factor = factor

    def run(self, model, ctx):
        node = next(n for n in model.graph if n.name == "fc2")
        replace_input(node, 1, const_value(node.inputs[1]) * self.factor, "W2_scaled")
        return PassOutcome(rewrites=[Rewrite("fc2", "scale", {"factor": self.factor})])


class Refuses(Pass):
    name, summary, exact = "refuses", "test pass", True

    def run(self, model, ctx):
        # mutates, then reports no rewrite: the runner must restore the model anyway
        next(iter(model.graph)).name = "renamed"
        out = PassOutcome()
        out.skip("fc1", "not applicable")
        return out


class Crashes(Pass):
    name, summary, exact = "crashes", "test pass", True

    def run(self, model, ctx):
        raise RuntimeError("boom")


def _model() -> ir.Model:
    return from_proto(tiny_mlp_proto())


def test_exact_pass_within_tolerance_is_applied():
    result = run_pipeline(_model(), [ScaleWeight(1.0)])
    rec = result.records[0]
    assert rec.status == "applied" and rec.rewrites == [Rewrite("fc2", "scale", {"factor": 1.0})]
    assert rec.error["max_rel"] == 0.0 and rec.error["cosine"] > 0.999999
    assert rec.flops_before == rec.flops_after > 0


def test_exact_pass_beyond_tolerance_is_rolled_back():
    model = _model()
    result = run_pipeline(model, [ScaleWeight(1.01)])
    rec = result.records[0]
    assert rec.status == "rolled-back"
    assert rec.error["max_rel"] > 1e-4 and "tolerance" in rec.note
    w2 = const_value(next(n for n in result.model.graph if n.name == "fc2").inputs[1])
    np.testing.assert_array_equal(w2, numpy_helper.to_array(tiny_mlp_proto().graph.initializer[2]))


def test_pass_without_rewrites_leaves_model_untouched():
    result = run_pipeline(_model(), [Refuses()])
    rec = result.records[0]
    assert rec.status == "skipped" and rec.skipped[0].reason == "not applicable"
    assert [n.name for n in result.model.graph][0] == "fc1"
    assert rec.error is None and rec.ops_before == rec.ops_after


def test_crashing_pass_is_rolled_back_with_note():
    result = run_pipeline(_model(), [Crashes(), ScaleWeight(1.0)])
    assert result.records[0].status == "rolled-back" and "boom" in result.records[0].note
    assert result.records[1].status == "applied"
    assert op_counts(result.model) == {"Add": 1, "MatMul": 2, "Relu": 1}


def test_records_count_params_and_flops():
    rec = run_pipeline(_model(), [ScaleWeight(1.0)]).records[0]
    assert rec.params_before == 8 * 16 + 16 + 16 * 8
    # 2 MatMuls of 4x8x16 MACs each, x2, plus one Add and one Relu over 4x16
    assert rec.flops_before == 2 * 2 * 4 * 8 * 16 + 2 * 4 * 16


def test_cleanup_folds_constants_and_drops_dead_nodes():
    from onnx import TensorProto, helper

    from effc.passes.cleanup import cleanup

    proto = tiny_mlp_proto()
    # a constant subgraph (Transpose of a constant) and a dead branch
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((8, 8), np.float32), "C"))
    proto.graph.node.insert(0, helper.make_node("Transpose", ["C"], ["Ct"], name="fold_me"))
    proto.graph.node.insert(1, helper.make_node("Relu", ["x"], ["dead"], name="dead"))
    proto.graph.node.insert(2, helper.make_node("MatMul", ["x", "Ct"], ["xc"], name="uses_folded"))
    proto.graph.node[-1].input[0] = "r"
    proto.graph.output.append(helper.make_tensor_value_info("xc", TensorProto.FLOAT, [1, 4, 8]))
    model = from_proto(proto)
    cleanup(model)
    names = [n.name for n in model.graph]
    assert "fold_me" not in names and "dead" not in names and "uses_folded" in names
