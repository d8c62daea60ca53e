"""GPT-2's flattened linears (Reshape -> Gemm -> Reshape, its Conv1D export) at bf16 and as a QDQ
int8 copy: the reshapes go around the bf16 product and around the int8 product's write-back
(zero-point correction, scale, bias, requantise), so the GELU and the residual add fuse into the
matmul kernels instead of running as kernels of their own; the result agrees with ONNX Runtime at
each precision's tolerance (effc.codegen.check.verify_build)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("tvm")

from effc.codegen.build import compile_model  # noqa: E402
from effc.codegen.check import verify_build  # noqa: E402
from effc.codegen.target import llvm_target  # noqa: E402
from effc.verify import make_inputs  # noqa: E402
from tests.codegen.qdq_models import calibration, quantize_qdq, x_to_y  # noqa: E402
from tests.codegen.test_int8_qdq import requires_vnni  # noqa: E402
from tests.codegen.test_matmul_bf16 import requires_bf16  # noqa: E402

BATCH, SEQ, K, HIDDEN = 2, 7, 24, 40  # odd sequence: 14 rows


def flattened_mlp() -> onnx.ModelProto:
    """x[2, 7, K] -> flat -> Gemm(W1, b1) -> back -> Gelu -> flat -> Gemm(W2, b2) -> back -> + x."""
    rng = np.random.default_rng(0)
    rows = BATCH * SEQ
    inits = [numpy_helper.from_array((rng.standard_normal((K, HIDDEN)) / np.sqrt(K)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, K)) / np.sqrt(HIDDEN)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(K).astype(np.float32) * 0.1, "b2"),
             numpy_helper.from_array(np.array([rows, K], np.int64), "flat1"),
             numpy_helper.from_array(np.array([BATCH, SEQ, HIDDEN], np.int64), "back1"),
             numpy_helper.from_array(np.array([rows, HIDDEN], np.int64), "flat2"),
             numpy_helper.from_array(np.array([BATCH, SEQ, K], np.int64), "back2")]
    nodes = [helper.make_node("Reshape", ["x", "flat1"], ["x2"]),
             helper.make_node("Gemm", ["x2", "W1", "b1"], ["g1"], name="c_fc"),
             helper.make_node("Reshape", ["g1", "back1"], ["h1"]),
             helper.make_node("Gelu", ["h1"], ["a1"], approximate="tanh"),
             helper.make_node("Reshape", ["a1", "flat2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "W2", "b2"], ["g2"], name="c_proj"),
             helper.make_node("Reshape", ["g2", "back2"], ["h2"]),
             helper.make_node("Add", ["h2", "x"], ["y"], name="residual")]
    shape = [BATCH, SEQ, K]
    return x_to_y(nodes, "flat_mlp", shape, shape, inits)


def compile_and_verify(model: ir.Model, out, precision: str):
    result = compile_model(model, "llvm", out, precision=precision)
    feeds = make_inputs(model, 2, seed=4)
    verify_build(out, model, feeds, llvm_target(), None, precision=result.precision)  # raises when off
    return result


def assert_epilogues_fused(kernels: dict, matmul_rule: str):
    """Two kernels in all, both the matmul rule's: GELU and the residual add are in their write-backs."""
    matmuls = {k: r for k, r in kernels.items() if r == matmul_rule}
    assert len(matmuls) == 2, kernels
    assert not [k for k, r in kernels.items() if r != matmul_rule and ("tanh" in k or "add" in k)], kernels
    assert any("tanh" in k for k in matmuls), kernels


@requires_bf16
def test_bf16_flattened_linears_fuse_gelu_and_residual(tmp_path):
    result = compile_and_verify(ir.from_proto(flattened_mlp()), tmp_path / "out", "bf16")
    assert result.precision == "bf16"
    assert_epilogues_fused(result.kernels, "matmul-bf16")


@requires_vnni
def test_int8_flattened_linears_fuse_gelu_and_residual(tmp_path):
    path = quantize_qdq(flattened_mlp(), tmp_path / "q.onnx", calibration([BATCH, SEQ, K]), op_types=("Gemm",))
    result = compile_and_verify(ir.from_proto(onnx.load(path)), tmp_path / "out", "fp32")
    assert_epilogues_fused(result.kernels, "int8-matmul")
