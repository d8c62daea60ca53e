"""Helpers shared by test modules across folders: the effc command line as a user runs it, the tiny
MLP the CLI and pipeline tests compile, and the slow mark for large zoo models (test modules import
from here, never from each other)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# Zoo models whose first build (an export of ~110-125M parameters) takes minutes on 2 cores, and
# whose passes and ORT runs take a minute more: every test that loads one is marked ``slow``, so
# ``-m "not slow"`` leaves out exactly those and ``-m slow`` runs them.
SLOW_ZOO = frozenset({"bert-base", "gpt2"})


def zoo_params(*names: str) -> list:
    """Parametrize values for zoo model names, the large ones marked slow."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_ZOO else name for name in names]


def effc(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m effc.cli ARGS`` (the checkout on PYTHONPATH), capturing its output."""
    return subprocess.run([sys.executable, "-m", "effc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def tiny_mlp_proto(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[1,4,8] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> y[1,4,8]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model
