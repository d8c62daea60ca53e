"""quantize: QDQ placement ONNX Runtime fuses, agreement with effc's numpy reference, calibration
memory, SmoothQuant exactness, GPTQ, records and refusals."""

from __future__ import annotations

import collections
import functools
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from effc.errors import EffcError
from effc.frontend.onnx import from_proto
from effc.ir import copy_model, op_counts, save, to_proto
from effc.passes import get_pass
from effc.passes._observers import BINS, Observer
from effc.passes._qdq_reference import run_reference
from effc.passes._qparams import quantize_weight
from effc.passes.base import PassContext, PassOutcome
from effc.passes.quantize import Quantize, smooth
from effc.passes._linears import find_linears
from effc.pipeline import pass_options, run_pipeline
from effc.verify import OrtRunner, deviation
from tests.helpers import effc
from tests.passes.layernorm_models import TinyGPT, export
from tests.passes.shift_add_models import mlp

# MatMulNBits computes in int8 by default (accuracy level 4): level 0 is its exact float path.
EXACT_NBITS = {"session.qdq_matmulnbits_accuracy_level": "0"}
FUSED = {"w8a8": "MatMulIntegerToFloat", "w8a8-dynamic": "DynamicQuantizeMatMul", "w8": "MatMulNBits",
         "w4": "MatMulNBits"}


def mlp_model(bias=True, opset=21):
    """The shared MLP with a symbolic batch, so batch 2 runs through the same graph."""
    proto = mlp(dims=(32, 64, 64, 32, 16), bias=bias)
    proto.opset_import[0].version = opset
    for v in list(proto.graph.input) + list(proto.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    return from_proto(proto)


def batches(count, seed=0, k=32, batch=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 16, k)).astype(np.float32)} for _ in range(count)]


def quantized(model, calibration=None, **options):
    model = copy_model(model)
    outcome = Quantize().run(model, PassContext(options=options, calibration=calibration))
    return model, outcome


def optimized_ops(model, level=None) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = f"{tmp}/optimized.onnx"
        opts.log_severity_level = 3
        ort.InferenceSession(to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(f"{tmp}/optimized.onnx").graph.node)


@functools.lru_cache(maxsize=1)
def _gpt():
    torch.manual_seed(0)  # the module's initial weights, whatever ran before
    return export(TinyGPT(d=32), torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0)))


def tiny_gpt():
    """A tiny pre-LN GPT (d 32, 2 blocks, tied head), exported once per session."""
    return copy_model(_gpt())


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- placement and agreement ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["w8a8", "w8a8-dynamic", "w8", "w4"])
def test_each_mode_fuses_in_onnx_runtime_and_matches_the_reference(mode):
    model = mlp_model()
    q, outcome = quantized(model, batches(6), mode=mode, ends=True, **({"block": 32} if mode in ("w8", "w4") else {}))
    assert [r.node for r in outcome.rewrites] == ["fc0", "fc1", "fc2", "fc3"]
    assert [v.name for v in q.graph.outputs] == ["y"]  # calibration's extra outputs are gone again
    assert optimized_ops(q)[FUSED[mode]] == 4 and optimized_ops(q)["MatMul"] == 0 and optimized_ops(q)["Gemm"] == 0
    x = batches(1, seed=5)[0]
    ours = run_reference(q, x)["y"]
    assert rel(OrtRunner(q, config=EXACT_NBITS)(x)["y"], ours) < 1e-5
    assert rel(ours, OrtRunner(model)(x)["y"]) < (0.05 if mode == "w4" else 0.02)
    assert len(outcome.layers) == 4 and all(l.bytes_after < l.bytes_before / 3 for l in outcome.layers)


def test_static_linear_followed_by_a_quantized_input_becomes_qlinearmatmul():
    q, _ = quantized(mlp_model(bias=False), batches(6), mode="w8a8", ends=True)
    ops = optimized_ops(q)
    assert ops["QLinearMatMul"] == 3 and ops["MatMulIntegerToFloat"] == 1  # the last one writes float
    x = batches(1, seed=3)[0]
    assert rel(OrtRunner(q)(x)["y"], run_reference(q, x)["y"]) < 1e-5


def test_static_placement_follows_the_qdq_conventions():
    q, outcome = quantized(mlp_model(), batches(6), mode="w8a8", activations="int8")
    counts = op_counts(q)
    # fc1, fc2 quantized (ends stay float): one Q per activation, DQ for input, weight and int32 bias
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 6 and counts["MatMul"] == 4
    inits = {v.name: v.const_value.numpy() for v in q.graph.initializers.values()}
    assert inits["fc1.weight_q"].dtype == np.int8 and inits["fc1.bias_q"].dtype == np.int32
    d = outcome.rewrites[0].details
    assert d["act_dtype"] == "int8" and d["act_zero_point"] == 0
    np.testing.assert_allclose(inits["fc1.bias_scale"], d["act_scale"] * inits["fc1.weight_scale"], rtol=1e-6)
    assert {s.node: s.reason for s in outcome.skipped}["fc0"].startswith("first layer")


def test_w4_is_int4_blocked_and_needs_opset_21():
    q, outcome = quantized(mlp_model(), batches(4), mode="w4", block=32)
    weight = q.graph.initializers["fc1.weight_q"]
    assert weight.dtype == onnx.TensorProto.INT4 or str(weight.dtype) == "INT4"
    assert q.graph.initializers["fc1.weight_scale"].shape == (2, 64)  # K/32 blocks x N
    assert all(r.details["gptq"] for r in outcome.rewrites)  # default with calibration data
    q, outcome = quantized(mlp_model(opset=17), batches(4), mode="w4", block=32)
    assert outcome.rewrites[0].action == "upgrade-opset" and q.opset_imports[""] == 21
    assert optimized_ops(q)["MatMulNBits"] == 2


@pytest.mark.parametrize("mode", ["w8a8", "w4"])
def test_tiny_transformer_keeps_norms_softmax_and_residuals_float(mode):
    model = tiny_gpt()
    calib = [{"idx": np.random.default_rng(i).integers(0, 50, (2, 8)).astype(np.int64)} for i in range(8)]
    calib = [{model.graph.inputs[0].name: f["idx"]} for f in calib]
    original = copy_model(model)
    result = run_pipeline(model, [get_pass("quantize")], feeds=calib[:2],
                          options={"quantize": {"mode": mode, "block": 32} if mode == "w4" else {"mode": mode}},
                          calibration=calib)
    record = result.records[0]
    assert record.status == "applied", record.note
    assert len(record.rewrites) == 8  # qkv, out, fc1, fc2 in each of 2 blocks; the tied head stays float
    before, after = record.ops_before, record.ops_after
    for op in ("LayerNormalization", "Softmax", "Add"):
        assert after.get(op, 0) >= before.get(op, 0), op
    assert record.error["cosine"] > 0.995
    assert optimized_ops(result.model)[FUSED[mode]] == 8
    x = calib[0]
    literal = OrtRunner(result.model, config=EXACT_NBITS)  # fused integer kernels vs the QDQ ops one by one
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(to_proto(result.model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = result.model.graph.outputs[0].name
    # other fusions (LayerNorm, attention) round differently and flip a few activation codes: far
    # below the quantization error itself
    fused, one_by_one = literal(x)[name], plain.run([name], x)[0]
    assert rel(fused, one_by_one) < min(1e-2, 0.2 * rel(one_by_one, OrtRunner(original)(x)[name]))


# --- SmoothQuant ----------------------------------------------------------------------------

def test_smoothquant_fold_is_exact_and_reports_what_cannot_fold():
    model = tiny_gpt()
    name = model.graph.inputs[0].name
    calib = [{name: np.random.default_rng(i).integers(0, 50, (2, 8)).astype(np.int64)} for i in range(4)]
    original = copy_model(model)
    outcome = PassOutcome()
    linears = [lin for lin in find_linears(model)[0] if not lin.protected]
    smooth(model, linears, calib, 0.5, outcome)
    smoothed = [r for r in outcome.rewrites if r.action == "smooth"]
    assert len(smoothed) == 4 and all("LayerNormalization" in r.details["into"] for r in smoothed)
    assert all(r.details["scale_max"] > r.details["scale_min"] for r in smoothed)  # a real, non-uniform s
    err = deviation(OrtRunner(model).run_all(calib), OrtRunner(original).run_all(calib))
    assert err.max_rel <= 1e-4
    reasons = [s.reason for s in outcome.skipped]
    assert any("cannot absorb" in r for r in reasons)  # fc2 reads GELU's output, out reads attention's


def test_smoothquant_lowers_w8a8_error_with_outlier_channels():
    model = tiny_gpt()
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    gamma = ln.inputs[1].const_value.numpy().copy()
    gamma[::7] *= 40.0  # outlier channels, as LayerNorm's gamma makes them in trained transformers
    ln.inputs[1].const_value = __import__("onnx_ir").tensor(gamma)
    name = model.graph.inputs[0].name
    calib = [{name: np.random.default_rng(i).integers(0, 50, (2, 8)).astype(np.int64)} for i in range(8)]
    plain, _ = quantized(model, calib, mode="w8a8", calibrate="minmax")
    smoothed, outcome = quantized(model, calib, mode="w8a8", calibrate="minmax", smoothquant_alpha=0.5)
    assert any(r.action == "smooth" for r in outcome.rewrites)
    ref = OrtRunner(model).run_all(calib)
    smoothed_err = deviation(OrtRunner(smoothed).run_all(calib), ref).max_rel
    assert smoothed_err < deviation(OrtRunner(plain).run_all(calib), ref).max_rel


# --- calibration ----------------------------------------------------------------------------

def test_observer_memory_does_not_grow_with_samples_and_rebinning_is_exact():
    rng = np.random.default_rng(0)
    obs = Observer(16)
    obs.update(rng.standard_normal((64, 16)) * 0.1)
    size = obs.nbytes
    total = 64 * 16
    for i in range(200):
        obs.update(rng.standard_normal((64, 16)) * (1 + i / 10))  # the range keeps growing
        total += 64 * 16
    assert obs.nbytes == size and obs.hist.shape == (BINS,)
    assert obs.hist.sum() == total  # re-binning kept every count
    lo, hi = obs.range("minmax")
    for method in ("percentile", "entropy"):
        a, b = obs.range(method)
        assert lo <= a < 0 < b <= hi and (b - a) < (hi - lo)  # clipped, within the observed range


def test_gptq_lowers_the_output_error_of_w4():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 64)) @ (np.eye(64) + 0.5 * rng.standard_normal((64, 64)))
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((48, 64)) * 0.1
    rtn = quantize_weight(w, h, 4, 32, gptq=False)
    gptq = quantize_weight(w, h, 4, 32, gptq=True)
    assert gptq.error < 0.7 * rtn.error
    assert np.abs(gptq.codes).max() <= 8 and gptq.scale.shape == (2, 48)


# --- records, options, refusals ------------------------------------------------------------

def test_layer_records_match_an_independent_measurement():
    model = mlp_model()
    calib = batches(6)
    q, outcome = quantized(model, calib, mode="w8a8", calibrate="minmax")
    layer = next(l for l in outcome.layers if l.node == "fc1")
    # fc1's float input, and its quantized output from the exported graph's own constants
    probe = copy_model(model)
    h0 = next(v for n in probe.graph for v in n.outputs if v.name == "r0")
    probe.graph.outputs.append(h0)
    w = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    xs = np.concatenate([OrtRunner(probe)(f)["r0"].reshape(-1, 64) for f in calib])
    y = xs @ w["W1"] + w["b1"]
    sub = copy_model(q)  # the quantized graph from fc1's input to its output, run in numpy
    yq = []
    for xr in xs.reshape(len(calib), -1, 64):
        env = {"r0": xr}
        for node in sub.graph:
            if node.name.startswith("fc1.") or node.name == "r0.quantize":
                from effc.passes._qdq_reference import OPS
                from effc.ir import const_value
                args = [env.get(v.name) if v.name in env else const_value(v) for v in node.inputs]
                env[node.outputs[0].name] = OPS[node.op_type](node, *args)
                last = node.outputs[0].name
        yq.append(env[last])
    yq = np.concatenate(yq).reshape(-1, 64)
    assert layer.rel_error == pytest.approx(rel(yq, y), rel=1e-3) and 1e-4 < layer.rel_error < 0.05
    assert layer.data == "calibration (6 samples)"
    d = next(r for r in outcome.rewrites if r.node == "fc1").details
    assert d["act_clip_ratio"] == 1.0 and 0 < d["weight_clip_ratio"] <= 1.0


def test_exclude_by_op_type_and_name_glob():
    _, outcome = quantized(mlp_model(), batches(2), mode="w8a8-dynamic", ends=True, exclude="fc2,fc0*")
    assert [r.node for r in outcome.rewrites] == ["fc1", "fc3"]
    assert {s.node: s.reason for s in outcome.skipped}["fc2"] == "excluded by 'fc2'"
    _, outcome = quantized(mlp_model(), None, mode="w8a8-dynamic", exclude="MatMul")
    assert not outcome.changed


def test_a_model_without_float_linears_is_skipped_with_a_reason():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="dynamic"), helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    result = run_pipeline(from_proto(proto), [get_pass("quantize")], options={"quantize": {"mode": "w8"}})
    record = result.records[0]
    assert record.status == "skipped" and record.skipped[0].reason == "weight is not a constant"
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["z"])], "r",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])])
    outcome = Quantize().run(from_proto(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 21)])),
                             PassContext(options={"mode": "w8"}))
    assert not outcome.changed and "no MatMul/Gemm linear" in outcome.skipped[0].reason


def test_bad_options_exit_2_with_one_line(tmp_path):
    path = tmp_path / "mlp.onnx"
    save(mlp_model(), path)
    proc = effc("compile", path, "-o", tmp_path / "out", "--passes", "quantize", "--set", "quantize.mode=w3")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "quantize.mode=w3" in proc.stderr
    proc = effc("compile", path, "-o", tmp_path / "out", "--passes", "quantize")  # w8a8 needs --calib
    assert proc.returncode == 2 and "needs calibration" in proc.stderr
    with pytest.raises(EffcError, match="quantize.block=48"):
        pass_options([get_pass("quantize")], {"quantize": {"block": "48"}}, calibration=True)
    with pytest.raises(EffcError, match="w8a8 modes"):
        Quantize().run(mlp_model(), PassContext(options={"mode": "w8", "smoothquant_alpha": 0.5}))


def test_openvino_runs_the_exported_model_like_the_reference(tmp_path):
    ov = pytest.importorskip("openvino")
    q, _ = quantized(mlp_model(), batches(6), mode="w8a8", ends=True)
    save(q, tmp_path / "q.onnx")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(tmp_path / "q.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = batches(1, seed=9)[0]
    got = compiled(x)[compiled.outputs[0]]
    assert rel(got, run_reference(q, x)["y"]) < 1e-2  # int8 in OpenVINO: same codes, its own rounding of x


def test_smoothquant_copies_a_post_ln_norm_that_the_residual_also_reads():
    from tests.passes.layernorm_models import TinyBERT

    model = export(TinyBERT(d=32), torch.randint(0, 50, (2, 8)))
    name = model.graph.inputs[0].name
    calib = [{name: np.random.default_rng(i).integers(0, 50, (2, 8)).astype(np.int64)} for i in range(4)]
    original = copy_model(model)
    outcome = PassOutcome()
    smooth(model, find_linears(model)[0], calib, 0.5, outcome)
    smoothed = [r for r in outcome.rewrites if r.action == "smooth"]
    assert len(smoothed) == 2 and all("a copy for the linears" in r.details["into"] for r in smoothed)
    assert op_counts(model)["LayerNormalization"] == op_counts(original)["LayerNormalization"] + 2
    assert deviation(OrtRunner(model).run_all(calib), OrtRunner(original).run_all(calib)).max_rel <= 1e-4


def test_auto_calibration_picks_the_range_with_the_least_layer_error():
    calib = batches(6)
    errors = {}
    for method in ("minmax", "percentile", "entropy", "auto"):
        _, outcome = quantized(mlp_model(), calib, mode="w8a8", calibrate=method)
        errors[method] = sum(l.rel_error ** 2 for l in outcome.layers)
    assert errors["auto"] <= min(errors[m] for m in ("minmax", "percentile", "entropy")) * (1 + 1e-9)


def test_budget_keeps_the_most_harmful_layers_float_with_the_measured_reason():
    from effc.budget import Budget, output_rel

    model = mlp_model()
    calib = batches(12)
    result = run_pipeline(model, [get_pass("quantize")], feeds=calib[:2], calibration=calib,
                          options={"quantize": {"mode": "w4", "block": 32, "ends": True, "gptq": False}},
                          budget=Budget.parse("rel<=0.03"))
    record = result.records[0]
    assert record.status == "applied", record.note
    kept = {s.node: s.reason for s in record.skipped}
    assert 0 < len(record.rewrites) < 4 and kept and all("kept in float" in r for r in kept.values())
    assert {r.node for r in record.rewrites} | set(kept) == {"fc0", "fc1", "fc2", "fc3"}
    holdout = calib[-3:]
    got = output_rel(OrtRunner(result.model).run_all(holdout), OrtRunner(model).run_all(holdout))
    assert got <= 0.03


def test_a_non_finite_activation_is_refused_not_looped_on():
    obs = Observer(4)
    with pytest.raises(EffcError, match="not finite"):
        obs.update(np.array([[1.0, np.inf, 0.0, 2.0]]))


def test_repq_reparameterisation_is_exact_and_evens_the_channel_ranges():
    from effc.passes._observers import observe

    model = tiny_gpt()
    name = model.graph.inputs[0].name
    calib = [{name: np.random.default_rng(i).integers(0, 50, (2, 8)).astype(np.int64)} for i in range(4)]
    original = copy_model(model)
    outcome = PassOutcome()
    linears = [lin for lin in find_linears(model)[0] if not lin.protected]
    smooth(model, linears, calib, None, outcome, repq=True)
    sites = [r for r in outcome.rewrites if r.action == "repq"]
    assert len(sites) == 4 and all(r.details["shift_absmax"] > 0 for r in sites)
    assert deviation(OrtRunner(model).run_all(calib), OrtRunner(original).run_all(calib)).max_rel <= 1e-4
    # after it, every channel of a norm output has (about) the same uint8 step
    x = next(v for v in (lin.x for lin in find_linears(model)[0]) if v.producer().op_type == "LayerNormalization")
    o = observe(model, calib, [x.name], progress=False)[x.name]
    steps = (np.maximum(o.channel_max, 0) - np.minimum(o.channel_min, 0)) / 255
    assert steps.std() / steps.mean() < 0.01
    q, outcome = quantized(tiny_gpt(), calib, mode="w8a8", repq=True)
    assert any(r.action == "repq" for r in outcome.rewrites) and len(outcome.layers) == 8
