"""The CPU matmul rule over every batch/rank layout a linear or attention matmul comes in: ranks 2-4,
batch > 1, odd sizes, constant and computed weights (per batch or broadcast), with and without an
epilogue. A row tile that straddles two fused row dims (x[2, 197, k] @ W: rows 192..199 span both
batches) once wrote rows it never computed; every build here must agree with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from effc.verify import OrtRunner, deviation, make_inputs
from tests.codegen.blocks import model_from_nodes

pytest.importorskip("tvm")

TOL = 1e-4


def _linear_model(lead: list[int], k: int, n: int, weight: str, epilogue: str, seed: int = 0):
    """x[*lead, k] @ B -> epilogue -> y[*lead, n]. ``weight``: const (initializer [k, n]), input
    (computed [*lead[:-1], k, n], one per batch) or shared (computed [k, n], broadcast)."""
    rng = np.random.default_rng(seed)
    inputs, inits = [("x", [*lead, k])], []
    if weight == "const":
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B"))
    else:
        inputs.append(("B", [*lead[:-1], k, n] if weight == "input" else [k, n]))
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"])]
    out_shape = [*lead, n]
    if epilogue == "none":
        nodes[0].output[0] = "y"
    elif epilogue == "bias-relu":
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
        nodes += [helper.make_node("Add", ["mm", "bias"], ["mmb"]), helper.make_node("Relu", ["mmb"], ["y"])]
    elif epilogue == "residual":
        inputs.append(("r", out_shape))
        nodes.append(helper.make_node("Add", ["mm", "r"], ["y"]))
    elif epilogue == "transpose":  # attention's [b, h, s, d] -> [b, s, h, d], fused into the write-back
        perm = list(range(len(out_shape)))
        perm[-3], perm[-2] = perm[-2], perm[-3]
        nodes.append(helper.make_node("Transpose", ["mm"], ["y"], perm=perm))
        out_shape = [out_shape[p] for p in perm]
    return model_from_nodes(nodes, inputs, [("y", out_shape)], inits)


def _check(model, tmp_path):
    from effc.codegen.build import compile_model, run_compiled

    result = compile_model(model, "llvm", tmp_path, records=None)
    feeds = make_inputs(model, 2, seed=3)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.max_rel < TOL, (dev, result.kernels)
    return result


@pytest.mark.parametrize("lead,k,n", [([2, 197], 384, 384), ([64, 49], 96, 96), ([1, 28, 28], 384, 384),
                                      ([3, 13], 37, 50)])
def test_issue_shapes_agree_and_stay_on_the_matmul_rule(tmp_path, lead, k, n):
    """The layouts of the report: batched and 4-D linears over a constant weight."""
    result = _check(_linear_model(lead, k, n, "const", "none"), tmp_path)
    assert list(result.kernels.values()) == ["matmul"], result.kernels


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lead=st.lists(st.integers(1, 23), min_size=1, max_size=3), k=st.integers(1, 70), n=st.integers(1, 70),
       weight=st.sampled_from(["const", "input", "shared"]),
       epilogue=st.sampled_from(["none", "bias-relu", "residual", "transpose"]))
def test_any_layout_agrees_with_onnx_runtime(tmp_path_factory, lead, k, n, weight, epilogue):
    if epilogue == "transpose" and len(lead) < 2:
        epilogue = "residual"  # a transpose of the row dims needs two of them
    _check(_linear_model(lead, k, n, weight, epilogue), tmp_path_factory.mktemp("mm"))


def test_unit_reduction_with_residual_is_not_added_twice(tmp_path):
    """k = 1: normalisation drops the reduction loop, and inlining the residual into the (still
    initialised) matmul block once added it in both the init and the update."""
    _check(_linear_model([1], 1, 1, "const", "residual"), tmp_path)
