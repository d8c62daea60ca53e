"""effc.codegen.qdq_tolerance: how far a compiled QDQ model may be from ONNX Runtime.

Found by the generality sweep (int8-effc, DeiT at batch 2): ONNX Runtime's fused run and the graph as
written agreed on the feed (rounding 5e-7), effc's module flipped one activation step that neither
did (its layer norm and GELU round in another order) and `effc compile` would have called the
correct module wrong (max rel err 6e-4 > 1e-4). The flip sensitivity is what such a step does."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.codegen.qdq_tolerance import flip_sensitivity, is_quantized, ort_rounding, tolerance_for
from tests.devices import requires_vnni

SCALE = 0.1


def activation_qdq_matmul(weight: np.ndarray, scale: float = SCALE):
    """y = DQ(Q(x; scale, 128)) @ weight: a per-tensor u8 activation quantization before a float linear."""
    k, n = weight.shape
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"), numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_a_value_within_float_rounding_of_a_step_widens_the_tolerance():
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model = activation_qdq_matmul(weight)
    x = np.full((1, 8), 1.0, np.float32)
    x[0, 3] = np.float32(0.25)  # 0.25 / 0.1f = 2.4999999: a float-rounding nudge takes it to step 3
    feeds = [{"x": x}]
    assert is_quantized(model)
    assert ort_rounding(model, feeds) < 1e-6  # ONNX Runtime's two runs agree on this feed...
    as_written = (np.round(x / np.float32(SCALE)) * np.float32(SCALE)) @ weight  # x[3] on step 2
    one_step = float(np.abs(SCALE * weight[3]).max() / np.abs(as_written).max())
    flips = flip_sensitivity(model, feeds)
    assert abs(flips - one_step) < 1e-3 * one_step  # ...and a flip moves y by one step of x[3]
    assert tolerance_for(model, feeds, 1e-4) >= 2 * flips > 1e-2


def test_values_far_from_a_step_keep_the_float_tolerance():
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model = activation_qdq_matmul(weight)
    feeds = [{"x": np.full((1, 8), 1.02, np.float32)}]  # 10.2 steps: float rounding cannot move it to 10.5
    assert flip_sensitivity(model, feeds) < 1e-5  # the moved scale itself, dequantizing: ~1e-6
    assert tolerance_for(model, feeds, 1e-4) == 1e-4


def test_a_bf16_build_of_a_qdq_model_is_held_to_the_steps_bf16_rounding_flips():
    """`effc compile QDQ --precision bf16`: the float ops bf16 computes feed QuantizeLinears, and bf16's
    rounding (2^-8, not fp32's) flips their steps; seen on a ViT QDQ copy at batch 2: max rel err 0.12
    (one CLS row's layer norm amplifying its flips), cosine 0.9998, beyond BF16_MAX_REL 0.1 alone."""
    from types import SimpleNamespace

    from effc.codegen.precision import BF16_MAX_REL, BF16_ROUNDING, within_tolerance

    weight = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    model = activation_qdq_matmul(weight, scale=0.5)  # coarse steps
    x = np.zeros((1, 64), np.float32)
    x[0, :8] = 1.248  # step 2.496: bf16's rounding (a few 1e-3) takes some of them to step 3, fp32's none
    feeds = [{"x": x}]
    tol = tolerance_for(model, feeds, 1e-4, eps=BF16_ROUNDING)
    assert tol > tolerance_for(model, feeds, 1e-4) and tol > BF16_MAX_REL
    flipped = SimpleNamespace(max_rel=0.12, cosine=0.9998)
    assert within_tolerance("bf16", flipped, tol) and not within_tolerance("bf16", flipped, 1e-4)
    assert not within_tolerance("bf16", SimpleNamespace(max_rel=0.12, cosine=0.99), tol)  # a wrong kernel's cosine


@requires_vnni
def test_a_wrong_int8_kernel_still_fails_the_compile(tmp_path, monkeypatch, capsys):
    """The widened tolerance is a few flipped steps, not a licence: integer matmuls that drop their
    zero-point correction (a legal, wrong kernel) are still called wrong (exit 1)."""
    from effc.codegen import qdq_lowering
    from effc.cli import run
    from tests.codegen.qdq_models import calibration, float_mlp, quantize_qdq

    real = qdq_lowering._plan

    def without_correction(*args):
        plan = real(*args)
        if plan is not None and plan.comp is not None:
            plan.comp = np.zeros_like(plan.comp)
        return plan

    monkeypatch.setattr(qdq_lowering, "_plan", without_correction)
    path = quantize_qdq(float_mlp(2, (5,), 24, 40), tmp_path / "q.onnx", calibration([2, 5, 24]))
    code = run(["compile", str(path), "-o", str(tmp_path / "out"), "--target", "llvm", "--passes", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "disagrees with ONNX Runtime" in err, err


def test_verify_build_holds_a_bf16_qdq_module_to_its_flipped_steps(tmp_path, monkeypatch):
    """effc.codegen.check.verify_build (what `effc compile --precision bf16` runs) on a module 0.12 from
    ONNX Runtime at cosine 0.9998: right for a QDQ graph whose steps bf16 flips that far, wrong for a
    float graph (there the bf16 bound, 0.1, is all there is)."""
    import json

    import pytest

    from effc.codegen import check
    from effc.codegen.runtime import MANIFEST
    from effc.codegen.target import make_target
    from effc.errors import EffcFault
    from effc.verify import Deviation

    (tmp_path / MANIFEST).write_text(json.dumps({}))
    monkeypatch.setattr(check, "compare_with_ort", lambda out_dir, model, feeds: Deviation(0.4, 0.12, 0.9998))
    monkeypatch.setattr(check, "find_wrong_kernels", lambda *args, **kwargs: [])  # no build to search
    monkeypatch.setattr("effc.codegen.build.front_half", lambda *args, **kwargs: (None, None, None))
    weight = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    x = np.zeros((1, 64), np.float32)
    x[0, :8] = 1.248  # within bf16's rounding of a step (as above)
    quantized = activation_qdq_matmul(weight, scale=0.5)
    dev = check.verify_build(tmp_path, quantized, [{"x": x}], make_target("llvm"), None, precision="bf16")
    assert dev.max_rel == 0.12 and json.loads((tmp_path / MANIFEST).read_text())["deviation_vs_ort"]
    floating = ir.from_proto(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(EffcFault, match="bf16 allows 0.1"):
        check.verify_build(tmp_path, floating, [{"x": x}], make_target("llvm"), None, precision="bf16")


def test_a_model_read_back_with_its_weights_in_a_data_file(tmp_path):
    """A compiled model.onnx keeps weights over 1 MiB in model.onnx.data; `effc bench` on a compiled
    ResNet-18 QDQ copy failed after its timings (ONNX Runtime given bytes cannot find a .data file)."""
    from effc.ir import EXTERNAL_DATA_THRESHOLD, save

    weight = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    assert weight.nbytes > EXTERNAL_DATA_THRESHOLD
    path = save(activation_qdq_matmul(weight), tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").exists()
    x = np.full((1, 512), 1.0, np.float32)
    x[0, 3] = np.float32(0.25)  # one value a float-rounding nudge moves to the next step
    feeds = [{"x": x}]
    assert ort_rounding(ir.load(str(path)), feeds) < 1e-6
    assert tolerance_for(ir.load(str(path)), feeds, 1e-4) > 1e-3
