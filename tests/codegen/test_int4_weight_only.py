"""int4 weight-only (opset 21 blocked DequantizeLinear -> MatMul) through codegen: the int4 kernel
(nibbles unpacked in registers) for M = 1 and M = 128 and odd shapes, the float path with its
reason for what the kernel does not tile; results equal ONNX Runtime.

The reference is ORT with graph optimisations off: it then runs DequantizeLinear -> MatMul in
float exactly as written. (Optimised, ORT fuses the pair into MatMulNBits, which may quantize the
activations to int8: a deviation of ~0.5% here, its own rounding, not the model's semantics.)"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")
from effc.codegen.build import compile_model  # noqa: E402
from effc.kernels import int4_cpu as k4  # noqa: E402
from tests.codegen.qdq_models import int4_matmul  # noqa: E402
from tests.devices import requires_avx512  # noqa: E402

TOL = 1e-5  # max abs diff relative to max |y|: float rounding only


def ort_exact(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def compile_and_compare(model, tmp_path, feed):
    from effc.codegen.runtime import load_compiled

    res = compile_model(ir.from_proto(model), "llvm", tmp_path / "out")
    got = load_compiled(tmp_path / "out")(feed)["y"]
    ref = ort_exact(model, feed)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    return res, json.loads((tmp_path / "out" / "codegen.json").read_text())


@requires_avx512
@pytest.mark.parametrize("rows, k, n, block, signed, zero_points", [
    ((1,), 256, 96, 128, False, True),      # decode: M = 1, N not a multiple of the panel (padded)
    ((2, 64), 96, 40, 32, True, False),      # M = 128 (batch 2), signed int4 without zero points
    ((3, 5), 64, 50, 16, False, True),       # rank 3, M = 15 (rows of 1 per tile), odd N
])
def test_int4_kernel_matches_ort(tmp_path, rows, k, n, block, signed, zero_points):
    model = int4_matmul(rows, k, n, block, signed=signed, zero_points=zero_points)
    feed = {"x": np.random.default_rng(3).standard_normal((*rows, k)).astype(np.float32)}
    res, manifest = compile_and_compare(model, tmp_path, feed)
    assert res.rule_hits.get("int4-unpack") == 1
    (entry,) = manifest["custom_ops"]
    assert entry["lowering"] == "int4-unpack" and entry["kernel"].startswith("int4_matmul_")


@requires_avx512
def test_block_the_kernel_does_not_tile_takes_the_float_path(tmp_path):
    model = int4_matmul((2,), 60, 24, 12)  # block 12: not a multiple of 8 nibbles
    feed = {"x": np.random.default_rng(1).standard_normal((2, 60)).astype(np.float32)}
    res, manifest = compile_and_compare(model, tmp_path, feed)
    assert "int4-unpack" not in res.rule_hits
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
