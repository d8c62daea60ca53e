"""Transcendental functions take vectorisable polynomial forms on CPU (exp, erf, tanh, x ** 3,
GELU in both spellings), and still agree with ONNX Runtime within 1e-4 on wide input ranges."""

from __future__ import annotations

import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes
from tests.codegen.checks import compile_and_compare

pytest.importorskip("tvm")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_op(tmp_path, approximate):
    model = model_from_nodes([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)],
                   [("x", [1, 37, 96])], [("y", [1, 37, 96])], opset=20)
    compile_and_compare(model, tmp_path)


def test_gpt2_tanh_gelu_with_pow3_and_softmax(tmp_path):
    """GPT-2's decomposed GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), then a softmax."""
    import numpy as np

    consts = {"three": 3.0, "k": 0.044715, "s": (2 / np.pi) ** 0.5, "one": 1.0, "half": 0.5}
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in consts.items()]
    nodes = [helper.make_node("Pow", ["x", "three"], ["x3"]), helper.make_node("Mul", ["x3", "k"], ["x3k"]),
             helper.make_node("Add", ["x", "x3k"], ["u"]), helper.make_node("Mul", ["u", "s"], ["us"]),
             helper.make_node("Tanh", ["us"], ["t"]), helper.make_node("Add", ["t", "one"], ["t1"]),
             helper.make_node("Mul", ["x", "t1"], ["xt"]), helper.make_node("Mul", ["xt", "half"], ["g"]),
             helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
    result = compile_and_compare(model_from_nodes(nodes, [("x", [1, 37, 100])], [("y", [1, 37, 100])], inits), tmp_path)
    assert not any("pow" in k for k in result.kernels), result.kernels  # x ** 3 became multiplies
