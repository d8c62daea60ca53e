"""int4 weight-only (opset 21 blocked DequantizeLinear -> MatMul) through codegen: the int4 kernels
for M = 1 and M = 128 and odd shapes, the float path with its reason for what they do not tile.

The exact kernel (nibbles unpacked to float; built for skylake-avx512, which has no VNNI and runs on
any AVX-512 host) equals ONNX Runtime with graph optimisations off, which runs DequantizeLinear ->
MatMul in float exactly as written. The VNNI kernel quantizes the activations to s8 per block, as
ONNX Runtime's MatMulNBits does by default once it fuses the pair: it is held to ONNX Runtime
optimised within twice ONNX Runtime's own rounding (effc.codegen.qdq_tolerance)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")
from effc.codegen.build import compile_model  # noqa: E402
from effc.kernels import int4_cpu as k4  # noqa: E402
from tests.codegen.qdq_models import int4_matmul  # noqa: E402
from effc.codegen.target import BuildTarget, host_threads, llvm_target  # noqa: E402
from tests.devices import requires_avx512  # noqa: E402

TOL = 1e-5  # max abs diff relative to max |y|: float rounding only


def ort_exact(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def exact_target():
    """skylake-avx512: AVX-512 without VNNI, so the exact kernel."""
    return BuildTarget("llvm", llvm_target(mcpu="skylake-avx512").spec, host_threads())


def host_has_vnni() -> bool:
    from effc.codegen.schedules.cpu.int8_matmul import has_vnni

    return has_vnni(llvm_target().tvm())


def compile_and_compare(model, tmp_path, feed, vnni: bool = False):
    from effc.codegen.qdq_tolerance import tolerance_for
    from effc.codegen.runtime import load_compiled

    res = compile_model(ir.from_proto(model), "llvm" if vnni else exact_target(), tmp_path / "out")
    got = load_compiled(tmp_path / "out")(feed)["y"]
    if vnni:
        import onnxruntime as ort

        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        tol = tolerance_for(ir.from_proto(model), [feed], TOL)
    else:
        ref, tol = ort_exact(model, feed), TOL
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    return res, json.loads((tmp_path / "out" / "codegen.json").read_text())


CASES = [
    ((1,), 256, 96, 128, False, True),      # decode: M = 1, N not a multiple of the panel (padded)
    ((2, 64), 96, 40, 32, True, False),      # M = 128 (batch 2), signed int4 without zero points
    ((3, 5), 64, 50, 16, False, True),       # rank 3, M = 15 (rows of 1 per tile), odd N
]


@requires_avx512
@pytest.mark.parametrize("rows, k, n, block, signed, zero_points", CASES)
def test_exact_int4_kernel_matches_ort(tmp_path, rows, k, n, block, signed, zero_points):
    model = int4_matmul(rows, k, n, block, signed=signed, zero_points=zero_points)
    feed = {"x": np.random.default_rng(3).standard_normal((*rows, k)).astype(np.float32)}
    res, manifest = compile_and_compare(model, tmp_path, feed)
    assert res.rule_hits.get("int4-unpack") == 1
    (entry,) = manifest["custom_ops"]
    assert entry["lowering"] == "int4-unpack" and entry["kernel"].startswith("int4_matmul_")


@pytest.mark.skipif(not host_has_vnni(), reason="this CPU lacks AVX-512 VNNI")
@pytest.mark.parametrize("rows, k, n, block, signed, zero_points", CASES)
def test_vnni_int4_kernel_matches_ort_matmulnbits(tmp_path, rows, k, n, block, signed, zero_points):
    model = int4_matmul(rows, k, n, block, signed=signed, zero_points=zero_points)
    feed = {"x": np.random.default_rng(3).standard_normal((*rows, k)).astype(np.float32)}
    res, manifest = compile_and_compare(model, tmp_path, feed, vnni=True)
    assert res.rule_hits.get("int4-vnni") == 1
    (entry,) = manifest["custom_ops"]
    assert entry["lowering"] == "int4-vnni" and entry["kernel"].startswith("int4_vnni_")


def test_vnni_kernel_matches_its_reference():
    """The VNNI kernel against its numpy statement (s8 activations per block), and that statement
    against exact dequantisation: within int8 activation rounding."""
    import tvm

    from effc.kernels import int4_vnni as kv

    if not host_has_vnni():
        pytest.skip("this CPU lacks AVX-512 VNNI")
    rng = np.random.default_rng(0)
    q, zp = rng.integers(0, 16, (64, 40)), rng.integers(0, 16, (2, 40))
    scale = (rng.random((2, 40)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    packed = kv.pack(q, scale, zp, 32, 64)
    func = kv.prim_func(3, 64, 64, 32, 4)
    lib = tvm.compile(tvm.IRModule({"int4_vnni": func}), target=llvm_target().tvm())
    out = np.zeros((3, 64), np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, packed.words, packed.scales, packed.zeros, out)]
    lib["int4_vnni"](*args)
    got, ref = args[-1].numpy()[:, :40], kv.reference(x, q, scale, zp, 32)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    exact = k4.reference(x, q, scale, zp, 32)
    assert 0 < np.abs(ref - exact).max() <= 0.02 * np.abs(exact).max()


@requires_avx512
def test_block_the_kernel_does_not_tile_takes_the_float_path(tmp_path):
    model = int4_matmul((2,), 60, 24, 12)  # block 12: not a multiple of 8 nibbles
    feed = {"x": np.random.default_rng(1).standard_normal((2, 60)).astype(np.float32)}
    res, manifest = compile_and_compare(model, tmp_path, feed)  # the float path: exact
    assert "int4-unpack" not in res.rule_hits and "int4-vnni" not in res.rule_hits
    (entry,) = manifest["custom_ops"]
    assert entry["lowering"] == "float (DQ folded)" and "block size 12" in entry["reason"]


def test_pack_roundtrip_and_reference():
    """The packed words hold nibble s of lane n at bits 4s..4s+3 for k = 8g + s (the kernel's reading)."""
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (64, 40))
    scale = rng.random((2, 40)).astype(np.float32)
    zp = rng.integers(0, 16, (2, 40))
    packed = k4.pack(q, scale, zp, 32, 32)
    words = packed.words.transpose(1, 0, 2).reshape(8, -1)[:, :40]  # [K/8, N]
    for s in range(8):
        assert np.array_equal((words >> (4 * s)) & 15, q[s::8])
    assert packed.scales.shape == (2, 2, 32) and not packed.scales[1, :, 8:].any()  # padded columns
    x = rng.standard_normal((3, 64))
    w = (q - np.repeat(zp, 32, axis=0)) * np.repeat(scale, 32, axis=0)
    assert np.allclose(k4.reference(x, q, scale, zp, 32), x @ w)


def test_verification_tolerance_is_ort_own_rounding_for_quantized_models():
    """ONNX Runtime fuses int4 DQ -> MatMul into MatMulNBits with int8 activations: its optimised run
    is ~0.5% from the graph as written; a compiled module is held to twice that, a float model to
    the float tolerance."""
    from effc.codegen.qdq_tolerance import is_quantized, ort_rounding, tolerance_for
    from tests.helpers import tiny_mlp_proto

    model = ir.from_proto(int4_matmul((4,), 128, 64, 32))
    feeds = [{"x": np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)}]
    assert is_quantized(model)
    rounding = ort_rounding(model, feeds)
    assert 1e-4 < rounding < 0.05
    assert tolerance_for(model, feeds, 1e-4) == pytest.approx(2 * rounding)
    plain = ir.from_proto(tiny_mlp_proto())
    assert not is_quantized(plain)
    assert tolerance_for(plain, [{"x": np.ones((1, 4, 8), np.float32)}], 1e-4) == 1e-4
