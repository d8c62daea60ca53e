"""A linear computed on its input flattened to 2-D (GPT-2's Conv1D: reshape, matmul, reshape back)
becomes the batched matmul, so its epilogue fuses into the matmul kernel; a flattened product that
has another reader is left alone; results agree with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes
from tests.codegen.checks import compile_and_compare

pytest.importorskip("tvm")

M, K, N = 12, 32, 48


def flattened_linear(extra_reader: bool = False):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([M, K], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, M, N], np.int64), "back")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "W"], ["p"]),
             helper.make_node("Reshape", ["p", "back"], ["p3"]), helper.make_node("Tanh", ["p3"], ["y"])]
    outputs = [("y", [1, M, N])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["p"], ["z"]))
        outputs.append(("z", [M, N]))
    return model_from_nodes(nodes, [("x", [1, M, K])], outputs, inits)


def rewritten(model):
    import tvm
    from tvm import relax

    from effc.codegen.relax_import import import_model
    from effc.codegen.unflatten_matmul import unflatten_matmul_pass

    mod = import_model(model).mod
    return tvm.transform.Sequential([unflatten_matmul_pass(), relax.transform.DeadCodeElimination()])(mod)


def test_reshapes_around_the_product_go():
    text = rewritten(flattened_linear())["main"].script()
    assert "R.reshape" not in text, text
    assert "R.matmul(x, " in text  # the 3-D input straight into the product


def test_a_product_read_elsewhere_is_kept():
    text = rewritten(flattened_linear(extra_reader=True))["main"].script()
    assert text.count("R.reshape") == 2 and text.count("R.matmul") == 1, text


def test_epilogue_fuses_and_matches_ort(tmp_path):
    result = compile_and_compare(flattened_linear(), tmp_path)
    fused = [k for k, rule in result.kernels.items() if rule == "matmul"]
    assert len(fused) == 1 and "tanh" in fused[0], result.kernels  # one kernel: product and its tanh


def merged_heads_linear():
    """x[2, 5, 4, 8] (heads not yet merged) -> Reshape [10, 32] -> MatMul -> Reshape [2, 5, 48] -> Tanh:
    attention's output projection, whose flatten also merges the heads."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((32, N)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([10, 32], np.int64), "flat"),
             numpy_helper.from_array(np.array([2, 5, N], np.int64), "back")]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "W"], ["p"]),
             helper.make_node("Reshape", ["p", "back"], ["p3"]), helper.make_node("Tanh", ["p3"], ["y"])]
    return model_from_nodes(nodes, [("x", [2, 5, 4, 8])], [("y", [2, 5, N])], inits)


def test_merged_heads_are_reshaped_to_the_output_rows(tmp_path):
    text = rewritten(merged_heads_linear())["main"].script()
    assert text.count("R.reshape") == 1 and "R.shape([2, 5, 32])" in text, text
    result = compile_and_compare(merged_heads_linear(), tmp_path)
    fused = [k for k, rule in result.kernels.items() if rule == "matmul"]
    assert len(fused) == 1 and "tanh" in fused[0], result.kernels
