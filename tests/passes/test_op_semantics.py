"""The op-semantics table: its answers for the ops the passes used to disagree on, and what each
pass does when a Neg, Cast or Dropout stands in its path (rewrite, or refuse with the reason)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.frontend.onnx import from_proto
from effc.ir import copy_model, op_counts
from effc.passes._op_semantics import (
    AFFINE,
    MOVES_DATA,
    SCALE,
    ZERO_MEAN,
    indexes_axis,
    ops_with,
    refusal,
)
from effc.passes._stream_axes import PLUMBING
from effc.passes.base import PassContext, PassOutcome
from effc.passes.fold_batchnorm import FoldBatchNorm
from effc.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from effc.passes.shift_add import Options, ShiftAdd
from effc.verify import OrtRunner, deviation, make_inputs

FLOAT = TensorProto.FLOAT


def _node(op: str, inputs=("x",), **attrs) -> ir.Node:
    """A lone node whose named inputs are constants (the table reads axes and modes from them)."""
    consts = {"axes": np.array([1], np.int64), "starts": np.array([0], np.int64), "ends": np.array([2], np.int64),
              "idx": np.array([0, 1], np.int64), "train": np.array(True), "eval": np.array(False)}
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, 4]))
    values = [None if not name else x if name == "x" else ir.Value(name=name, const_value=ir.tensor(consts[name]))
              for name in inputs]
    return ir.node(op, values, attrs, name="n")


# --- the table ------------------------------------------------------------------------------

def test_neg_keeps_zero_mean_and_scale_but_not_an_affine():
    neg = _node("Neg")
    assert refusal(neg, ZERO_MEAN) is None and refusal(neg, SCALE) is None
    assert "flips the sign" in refusal(neg, AFFINE)
    assert refusal(neg, MOVES_DATA) is not None


def test_cast_to_float_moves_data_but_a_fold_across_it_is_inexact():
    cast = _node("Cast", to=FLOAT)
    assert refusal(cast, MOVES_DATA) is None and refusal(cast, ZERO_MEAN) is None
    assert refusal(cast, AFFINE) is None  # in real arithmetic it commutes ...
    assert "another precision" in refusal(cast, AFFINE, exact=True)  # ... but not bit for bit
    assert "non-float" in refusal(_node("Cast", to=TensorProto.INT32), ZERO_MEAN)


def test_dropout_is_the_identity_only_in_inference_mode():
    assert all(refusal(_node("Dropout"), p, exact=True) is None for p in (MOVES_DATA, SCALE, AFFINE, ZERO_MEAN))
    assert refusal(_node("Dropout", ("x", "", "eval")), AFFINE, exact=True) is None
    assert "training mode" in refusal(_node("Dropout", ("x", "", "train")), ZERO_MEAN)


def test_gather_and_slice_commute_only_off_the_channel_axis():
    gather, sliced = _node("Gather", ("x", "idx"), axis=1), _node("Slice", ("x", "starts", "ends", "axes"))
    for node in (gather, sliced):
        assert all(refusal(node, p, exact=True) is None for p in (MOVES_DATA, SCALE, AFFINE, ZERO_MEAN))
        assert "indexes the channel axis" in indexes_axis(node, 1, 3)
        assert indexes_axis(node, 2, 3) is None and indexes_axis(node, -1, 3) is None


def test_unknown_ops_have_no_property():
    assert "not in the op-semantics table" in refusal(_node("Relu"), MOVES_DATA)


def test_each_analysis_gets_its_own_set():
    assert ops_with(AFFINE, exact=True) >= {"Identity", "Dropout", "Transpose", "Gather", "Slice"}
    assert not ops_with(AFFINE, exact=True) & {"Neg", "Cast"}
    assert PLUMBING >= {"Neg", "Cast", "Dropout"} and not PLUMBING & {"Gather", "Slice"}  # own steps there
    assert ops_with(MOVES_DATA) >= {"Cast", "Dropout", "Gather", "Slice"} and "Neg" not in ops_with(MOVES_DATA)


# --- fold-batchnorm -------------------------------------------------------------------------

def _bn_then(op: str | None, attrs: dict | None = None, bn_first: bool = True) -> ir.Model:
    """x [3, 6] -> BN -> op -> MatMul (bn_first) or x -> MatMul -> op -> BN."""
    rng = np.random.default_rng(0)
    c = 6
    params = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.uniform(-1, 1, c),
              "mean": rng.uniform(-1, 1, c), "var": rng.uniform(0.05, 2, c)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((c, c)).astype(np.float32), "W"))
    bn = lambda i, o: helper.make_node("BatchNormalization", [i, "gamma", "beta", "mean", "var"], [o], name="bn")
    mm = lambda i, o: helper.make_node("MatMul", [i, "W"], [o], name="fc")
    mid = [helper.make_node(op, ["a"], ["b"], name="mid", **(attrs or {}))] if op else []
    first, second = (bn, mm) if bn_first else (mm, bn)
    nodes = [first("x", "a"), *mid, second("b" if op else "a", "y")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [3, c])],
                                                [helper.make_tensor_value_info("y", FLOAT, [3, c])], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    return from_proto(proto)


@pytest.mark.parametrize("bn_first", [True, False])
@pytest.mark.parametrize("op, attrs, reason", [("Neg", {}, "flips the sign"),
                                               ("Cast", {"to": FLOAT}, "another precision")])
def test_fold_batchnorm_refuses_across_neg_and_cast(op, attrs, reason, bn_first):
    model = _bn_then(op, attrs, bn_first)
    outcome = FoldBatchNorm().run(model, PassContext())
    assert outcome.rewrites == [] and len(outcome.skipped) == 1
    assert reason in outcome.skipped[0].reason and f"{op} 'mid'" in outcome.skipped[0].reason, outcome.skipped


@pytest.mark.parametrize("bn_first", [True, False])
def test_fold_batchnorm_folds_across_inference_dropout(bn_first):
    model = _bn_then("Dropout", bn_first=bn_first)
    folded = copy_model(model)
    outcome = FoldBatchNorm().run(folded, PassContext())
    assert len(outcome.rewrites) == 1 and "BatchNormalization" not in op_counts(folded), outcome.skipped
    feeds = make_inputs(model, count=2, seed=1)
    assert deviation(OrtRunner(folded).run_all(feeds), OrtRunner(model).run_all(feeds)).max_rel <= 1e-5


# --- layernorm-to-rmsnorm -------------------------------------------------------------------

def _embedding_stream(op: str | None, attrs: dict | None = None, training: bool | None = None) -> ir.Model:
    """ids -> Gather(E) -> op -> LayerNorm -> MatMul: the stream's writer is the embedding table."""
    rng = np.random.default_rng(1)
    d, vocab = 8, 11
    inits = [numpy_helper.from_array((rng.standard_normal((vocab, d)) + 0.5).astype(np.float32), "E"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, d).astype(np.float32), "g"),
             numpy_helper.from_array(rng.uniform(-1, 1, d).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((d, 5)).astype(np.float32), "W")]
    inputs = ["h"]
    if training is not None:
        inits.append(numpy_helper.from_array(np.array(training), "training"))
        inputs = ["h", "", "training"]
    mid = [helper.make_node(op, inputs, ["s"], name="mid", **(attrs or {}))] if op else []
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"), *mid,
             helper.make_node("LayerNormalization", ["s" if op else "h", "g", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "W"], ["y"], name="head")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 3, 5])], inits), opset_imports=[helper.make_opsetid("", 18)])
    return from_proto(proto)


@pytest.mark.parametrize("op, attrs", [("Neg", {}), ("Cast", {"to": FLOAT}), ("Dropout", {})])
def test_layernorm_to_rmsnorm_converts_across_neg_cast_and_dropout(op, attrs):
    model = _embedding_stream(op, attrs)
    converted = copy_model(model)
    outcome = LayerNormToRMSNorm().run(converted, PassContext())
    assert outcome.skipped == [] and "LayerNormalization" not in op_counts(converted)
    assert any(r.action == "recentre" and r.details["op"] == "Gather" for r in outcome.rewrites), outcome.rewrites
    feeds = make_inputs(model, count=2, seed=1)
    assert deviation(OrtRunner(converted).run_all(feeds), OrtRunner(model).run_all(feeds)).max_rel <= 1e-4


def test_layernorm_to_rmsnorm_refuses_a_dropout_in_training_mode():
    outcome = LayerNormToRMSNorm().run(_embedding_stream("Dropout", training=True), PassContext())
    assert outcome.rewrites == [] and len(outcome.skipped) == 1
    assert "Dropout" in outcome.skipped[0].reason and "training mode" in outcome.skipped[0].reason


# --- shift-add's layer protection -----------------------------------------------------------

def _three_linears(op: str | None, attrs: dict | None = None) -> ir.Model:
    rng = np.random.default_rng(2)
    dims = (16, 24, 16, 8)
    inits = [numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"W{i}")
             for i, (a, b) in enumerate(zip(dims, dims[1:]))]
    mid = [helper.make_node(op, ["x"], ["x1"], name="mid", **(attrs or {}))] if op else []
    nodes = [*mid, helper.make_node("MatMul", ["x1" if op else "x", "W0"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["r0"]), helper.make_node("MatMul", ["r0", "W1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["y"], name="fc2")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [3, 16])],
        [helper.make_tensor_value_info("y", FLOAT, [3, 8])], inits), opset_imports=[helper.make_opsetid("", 18)])
    return from_proto(proto)


@pytest.mark.parametrize("op, attrs, first_protected", [
    (None, {}, True), ("Dropout", {}, True), ("Cast", {"to": FLOAT}, True),
    ("Neg", {}, False),  # Neg computes: the linear behind it does not read the model's input as is
])
def test_shift_add_protects_the_first_layer_behind_ops_that_only_move_data(op, attrs, first_protected):
    outcome = PassOutcome()
    selected = ShiftAdd.select(_three_linears(op, attrs), Options(), outcome)
    reasons = {s.node: s.reason for s in outcome.skipped}
    assert ("first layer" in reasons.get("fc0", "")) == first_protected, reasons
    assert "last layer" in reasons["fc2"]
    assert [lin.name for lin in selected] == (["fc1"] if first_protected else ["fc0", "fc1"])
