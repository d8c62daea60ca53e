"""QDQ models (made by ONNX Runtime's quantize_static) through codegen: DQ, DQ -> MatMul/Gemm on the
int8 VNNI rule, everything else (requantisation, bias, GELU, residual) fused into its write-back;
the result agrees with ONNX Runtime running the same QDQ model.

Measure: max |effc - ORT| <= one quantisation step of the last requantised tensor (both engines
round the same integer accumulators; in practice the outputs are equal to float rounding) and
cosine >= 0.9999."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")
from effc.codegen.build import compile_model  # noqa: E402
from effc.codegen.runtime import load_compiled  # noqa: E402
from effc.codegen.target import BuildTarget, llvm_target  # noqa: E402
from tests.codegen.qdq_models import calibration, float_attention, float_mlp, quantize_qdq  # noqa: E402


def host_has_vnni() -> bool:
    from effc.codegen.schedules.cpu.int8_matmul import has_vnni

    return has_vnni(llvm_target().tvm())


requires_vnni = pytest.mark.skipif(not host_has_vnni(), reason="this CPU lacks AVX-512 VNNI: no int8 kernels here")


def ort_run(path, feed):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def compile_and_compare(path, out, feed, step, target=None):
    res = compile_model(ir.from_proto(onnx.load(str(path))), target or "llvm", out)
    got = load_compiled(out)(feed)
    got = got[next(iter(got))]
    ref = ort_run(path, feed)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    cos = float(np.dot(got.ravel(), ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert diff <= step, f"max abs diff {diff} > one quantisation step {step}"
    assert cos >= 0.9999
    return res, json.loads((out / "codegen.json").read_text())


def step_of(path, name: str) -> float:
    model = onnx.load(str(path))
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name))


@requires_vnni
@pytest.mark.parametrize("rows, k, hidden, activation", [
    ((5,), 37, 50, "u8"),     # rank 3, odd sizes: n and k padded, a row tail
    ((), 64, 96, "u8"),       # rank 2
    ((3, 5), 24, 40, "s8"),   # rank 4, s8 activations (moved to u8 for vpdpbusd)
])
def test_mlp_on_int8_kernels_matches_ort(tmp_path, rows, k, hidden, activation):
    shape = [2, *rows, k]
    path = quantize_qdq(float_mlp(2, rows, k, hidden), tmp_path / "q.onnx", calibration(shape),
                        activation=activation)
    zps = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
           if t.name.endswith("_zero_point") and t.dims == []}
    assert any(int(v) != 0 for v in zps.values()), "the test needs nonzero activation zero points"
    feed = {"x": calibration(shape, 1, seed=9)[0]}
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "m2_scale"))
    assert res.rule_hits.get("int8-matmul") == 2
    lowered = {c["node"]: c["lowering"] for c in manifest["custom_ops"]}
    assert lowered == {"fc1": "int8-vnni", "fc2": "int8-vnni"}
    # fc1's kernel holds its requantisation, the bias, GELU and the next layer's quantisation:
    # the graph between the two matmuls is one kernel
    assert sum(1 for r in res.kernels.values() if r == "int8-matmul") == 2
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", str(tmp_path / "out" / "model.so")], capture_output=True,
                             text=True).stdout
        assert "vpdpbusd" in asm


def gemm_qdq(tmp_path) -> tuple:
    """x[3, 33] -> Gemm(W^T [20, 33], C) quantized by ORT (bias as int32 + DQ)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((20, 33)).astype(np.float32) * 0.2, "W"),
             numpy_helper.from_array(rng.standard_normal(20).astype(np.float32), "C")]
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 33])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 20])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = quantize_qdq(model, tmp_path / "g.onnx", calibration([3, 33]), op_types=("Gemm",))
    return path, {"x": calibration([3, 33], 1, seed=5)[0]}


@requires_vnni
def test_gemm_with_quantized_bias_matches_ort(tmp_path):
    path, feed = gemm_qdq(tmp_path)
    _, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale"))
    assert [c["lowering"] for c in manifest["custom_ops"]] == ["int8-vnni"]


@requires_vnni
@pytest.mark.parametrize("batch, seq, heads, head_dim", [(2, 9, 3, 8), (1, 13, 2, 6), (2, 19, 2, 8)])
def test_attention_matmuls_on_int8_kernels(tmp_path, batch, seq, heads, head_dim):
    """Q.K^T and P.V (both operands through DQ) on the int8 rule too: B moved to s8, the zero points
    corrected by A's row sums and B's column sums (nonzero here for Q, K and V; 0 for P). Odd sequence
    lengths pad P.V's k; head_dim 6 pads Q.K^T's; rows of 19 (one vector and a tail) take the softmax
    rule with the probabilities' QuantizeLinear in its normalising pass."""
    dim = heads * head_dim
    path = quantize_qdq(float_attention(batch, seq, heads, head_dim), tmp_path / "a.onnx",
                        calibration([batch, seq, dim]))
    zps = {t.name: int(numpy_helper.to_array(t)) for t in onnx.load(path).graph.initializer
           if t.name.endswith("_zero_point") and t.dims == []}
    assert all(zps[f"{t}_zero_point"] not in (0, 128) for t in ("qh", "kh", "vh")), zps
    feed = {"x": calibration([batch, seq, dim], 1, seed=9)[0]}
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "o_scale"))
    lowered = {c["node"]: (c["lowering"], c["reason"]) for c in manifest["custom_ops"]}
    assert lowered["qk"] == lowered["pv"] == ("int8-vnni", "")
    assert res.rule_hits.get("int8-matmul") == 6
    # the q, k, v heads' QuantizeLinear move ahead of their Reshape/Transpose; the merged heads'
    # DQ -> Transpose -> Reshape -> Q (the same scale and zero point) carries the bytes instead
    assert "3 QuantizeLinear moved ahead of Reshape/Transpose" in res.custom_summary, res.custom_summary
    assert "1 DequantizeLinear/QuantizeLinear pairs around Reshape/Transpose/Split dropped" in res.custom_summary
    assert not any(r == "matmul" for r in res.kernels.values()), res.kernels
    # every QuantizeLinear runs in its producer's write-back (the heads' Reshape/Transpose move
    # bytes after it: effc.codegen.qdq_hoist), none as a pass of its own over float memory
    assert not [k for k, r in res.kernels.items() if r == "elementwise" and "quantize" in k], res.kernels
    if seq >= 16:
        softmax = [k for k, r in res.kernels.items() if r == "softmax"]
        assert len(softmax) == 1 and "softmax_quantize" in softmax[0], res.kernels


def test_cpu_without_vnni_takes_the_float_path(tmp_path):
    """skylake-avx512 has AVX-512BW but no VNNI: no int8 rule, the reason recorded, results right
    (the code runs on any AVX-512 host, this one included)."""
    from effc.codegen.target import host_threads
    from tests.devices import host_has_avx512

    if not host_has_avx512():
        pytest.skip("this CPU lacks AVX-512F: a skylake-avx512 build cannot run here")
    spec = llvm_target(mcpu="skylake-avx512").spec
    target = BuildTarget("llvm", spec, host_threads())
    path = quantize_qdq(float_mlp(2, (5,), 37, 50), tmp_path / "q.onnx", calibration([2, 5, 37]))
    feed = {"x": calibration([2, 5, 37], 1, seed=9)[0]}
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "m2_scale"), target)
    assert "int8-matmul" not in res.rule_hits
    assert {c["reason"] for c in manifest["custom_ops"]} == {"the CPU has no AVX-512 VNNI"}


ALL_OPS = ("MatMul", "Mul", "Add", "Softmax", "Reshape", "Transpose")


@requires_vnni
@pytest.mark.parametrize("seq, head_dim, activation, symmetric, mask", [
    (37, 32, "u8", False, True),     # nonzero zero points on both sides, a real mask, 1/sqrt(32)
    (197, 64, "s8", True, "zero"),   # ViT's shape: zero points 0, a constant zero mask, 1/8
])
def test_all_ops_attention_quantizes_the_scores_once(tmp_path, seq, head_dim, activation, symmetric, mask):
    """A copy quantized with every op (as the benchmarked ViT/BERT copies are) requantises the scores
    after Q.K^T, after the 1/sqrt(d) Mul and after the mask Add; the Mul's (and a zero mask's) Q give
    back their input's bytes and are dropped (effc.codegen.qdq_identity), so Q.K^T's write-back
    quantizes once (twice with a real mask). Batch 2, 3 heads; agrees with ORT within one step."""
    batch, heads = 2, 3
    shape = [batch, seq, heads * head_dim]
    path = quantize_qdq(float_attention(batch, seq, heads, head_dim, mask=mask), tmp_path / "a.onnx",
                        calibration(shape), op_types=ALL_OPS, activation=activation, symmetric=symmetric)
    zps = {t.name: int(numpy_helper.to_array(t)) for t in onnx.load(path).graph.initializer
           if t.name.endswith("_zero_point") and t.dims == []}
    assert all((zps[f"{t}_bias_zero_point"] == 0) == symmetric for t in "qkv"), zps
    feed = {"x": calibration(shape, 1, seed=9)[0]}
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale"))
    lowered = {c["node"]: c["lowering"] for c in manifest["custom_ops"]}
    assert lowered["qk"] == lowered["pv"] == "int8-vnni"
    unit = 1 if mask is True else 2
    assert f"{unit} QuantizeLinear giving back their input's bytes" in res.custom_summary, res.custom_summary
    qk = [k for k in res.kernels if k.startswith("fused_matmul") and "subtract" in k and k.count("quantize") > 0]
    assert qk and min(k.count("quantize") - k.count("dequantize") for k in qk) <= (2 if mask is True else 1), qk


def test_k_transposed_heads_are_read_as_rows():
    """Q.K^T's B = Transpose(K heads, perm 0,2,3,1) is taken as B^T = one permute of K's rows that
    keeps their 64 bytes contiguous (0,2,1,3), no byte transpose; V's heads (0,2,1,3) stay B."""
    from tvm import relax

    from effc.codegen.product_nt import rows_transposed

    bb = relax.BlockBuilder()
    k = relax.Var("k", relax.TensorType([1, 197, 6, 64], "uint8"))
    with bb.function("f", [k]):
        k_t = bb.emit(relax.op.permute_dims(k, [0, 2, 3, 1]))
        rows = rows_transposed(bb, k_t)
        assert rows is not None and [int(a) for a in rows.attrs.axes] == [0, 2, 1, 3]
        assert [int(d) for d in bb.normalize(rows).ty.shape] == [1, 6, 197, 64]
        v_heads = bb.emit(relax.op.permute_dims(k, [0, 2, 1, 3]))
        assert rows_transposed(bb, v_heads) is None
        assert rows_transposed(bb, k) is None
        bb.emit_func_output(k_t)
