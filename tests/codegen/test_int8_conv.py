"""QDQ convolutions (ONNX Runtime's quantize_static) on the int8 VNNI rule: W (s8) times the u8 im2col,
the zero point, per-channel scale, bias, ReLU, residual Add and the output QuantizeLinear in the
GEMM's write-back; the result agrees with ONNX Runtime on the same QDQ model.

Measure (as tests/codegen/test_int8_qdq.py): max |effc - ORT| <= one quantisation step of the output
tensor y and cosine >= 0.9999."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("tvm")
from tests.codegen.qdq_conv_models import float_conv  # noqa: E402
from tests.codegen.qdq_models import calibration, quantize_qdq  # noqa: E402
from tests.codegen.test_int8_qdq import compile_and_compare, step_of  # noqa: E402
from tests.devices import requires_vnni  # noqa: E402

CASES = {  # (batch, channels, out, spatial, kernel, stride, pad, dilation), conv options, quantisation
    "pointwise": ((1, 16, 24, (9, 7), 1, 1, 0, 1), {}, {}),
    "3x3 s1 p1 odd 13x11, batch 2, s8": ((2, 8, 12, (13, 11), 3, 1, 1, 1), {}, {"activation": "s8"}),
    "3x3 s2 per-tensor, no bias": ((1, 8, 16, (13, 11), 3, 2, 1, 1), {"bias": False}, {"per_channel": False}),
    "7x7 s2 stem, 3 channels": ((2, 3, 8, (23, 19), 7, 2, 3, 1), {}, {}),
    "residual, no relu": ((2, 12, 12, (6, 5), 3, 1, 1, 1), {"relu": False, "residual": True}, {}),
    "1-D k3 dilation 2, s8": ((2, 6, 10, (17,), 3, 1, 2, 2), {}, {"activation": "s8"}),
    "patch 4x4 s4 (ViT)": ((1, 3, 16, (16, 12), 4, 4, 0, 1), {"relu": False}, {}),
}


def qdq_conv(tmp_path, geometry, options, quant):
    batch, c, o, spatial, kernel, stride, pad, dilation = geometry
    shape = [batch, c, *spatial]
    model = float_conv(batch, c, o, spatial, kernel, stride, pad, dilation, **options)
    path = quantize_qdq(model, tmp_path / "q.onnx", calibration(shape), op_types=("Conv", "Relu", "Add"),
                        **quant)
    return path, {"x": calibration(shape, 1, seed=9)[0]}


@requires_vnni
@pytest.mark.parametrize("case", list(CASES))
def test_qdq_conv_on_int8_kernels_matches_ort(tmp_path, case):
    path, feed = qdq_conv(tmp_path, *CASES[case])
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale"))
    assert [(c["node"], c["lowering"]) for c in manifest["custom_ops"]] == [("conv", "int8-vnni")]
    assert res.rule_hits.get("int8-matmul") == 1, res.kernels
    assert "QDQ matmuls and convs: 1 of 1 on the int8-vnni kernels" in res.custom_summary, res.custom_summary
    # the output QuantizeLinear (and a residual Add) run in the GEMM's write-back, not over float memory
    gemm = next(k for k, r in res.kernels.items() if r == "int8-matmul")
    assert "quantize" in gemm, res.kernels
    if CASES[case][1].get("residual"):
        assert "add" in gemm.split("quantize", 1)[1], gemm


@requires_vnni
def test_zero_points_and_signed_activations_are_exercised(tmp_path):
    """The cases above are not vacuous: the input's zero point is nonzero (u8 and s8), so the
    padding taps and the zero-point correction matter."""
    for case in ("pointwise", "3x3 s1 p1 odd 13x11, batch 2, s8"):
        path, _ = qdq_conv(tmp_path, *CASES[case])
        zp = next(numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer if t.name == "x_zero_point")
        assert int(zp) not in (0, 128) if zp.dtype.kind == "u" else int(zp) != 0, zp
        assert zp.dtype.kind == ("i" if "s8" in case else "u")


@requires_vnni
def test_grouped_conv_stays_float_with_its_reason(tmp_path):
    path, feed = qdq_conv(tmp_path, (1, 8, 8, (7, 6), 3, 1, 1, 1), {"groups": 8}, {})
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale"))
    assert [(c["lowering"], c["reason"]) for c in manifest["custom_ops"]] == \
        [("float (DQ folded)", "a grouped or depthwise conv (groups > 1)")]
    assert "int8-matmul" not in res.rule_hits


def test_cpu_without_vnni_keeps_convs_float(tmp_path):
    """skylake-avx512 (AVX-512, no VNNI): the conv stays on the float path, the reason recorded."""
    from effc.codegen.target import BuildTarget, host_threads, llvm_target
    from tests.devices import host_has_avx512

    if not host_has_avx512():
        pytest.skip("this CPU lacks AVX-512F: a skylake-avx512 build cannot run here")
    target = BuildTarget("llvm", llvm_target(mcpu="skylake-avx512").spec, host_threads())
    path, feed = qdq_conv(tmp_path, *CASES["3x3 s2 per-tensor, no bias"])
    res, manifest = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale"), target)
    assert "int8-matmul" not in res.rule_hits
    assert {c["reason"] for c in manifest["custom_ops"]} == {"the CPU has no AVX-512 VNNI"}
