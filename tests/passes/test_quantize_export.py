"""quantize, end to end through `effc compile`: the exported QDQ model is what ONNX Runtime fuses into its
integer kernels (checked in the graph ORT itself writes with ``optimized_model_filepath``) and what
OpenVINO loads and runs, the two engines agreeing within int8 rounding, beyond batch 1 and at odd lengths."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from effc.frontend.torch import from_torch
from effc.ir import save
from tests.helpers import effc

D, HIDDEN, CLASSES = 32, 64, 10
FUSED = {"w8a8": {"QLinearMatMul", "MatMulIntegerToFloat"}, "w4": {"MatMulNBits"}}
SETTINGS = {"w8a8": ["quantize.mode=w8a8", "quantize.calibrate=percentile"],
            "w4": ["quantize.mode=w4", "quantize.block=32", "quantize.gptq=true"]}


class Encoder(nn.Module):
    """Pre-LN residual MLP blocks and a classifier head: LayerNorm, GELU and the residual Adds must stay float."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(D), nn.Linear(D, HIDDEN), nn.GELU(),
                                                  nn.Linear(HIDDEN, D)) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, CLASSES)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def inputs(batch: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, D)).astype(np.float32)
    x[..., 3] *= 8.0  # an outlier channel, as transformer activations have
    return x


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{mode: (fp32 path, quantized path)} compiled once for the module."""
    tmp = tmp_path_factory.mktemp("qexport")
    torch.manual_seed(0)
    batch, length = torch.export.Dim("batch", max=64), torch.export.Dim("length", max=512)
    model = from_torch(Encoder(), (torch.from_numpy(inputs(2, 5, 0)),), input_names=["x"], output_names=["y"],
                       dynamic_shapes=({0: batch, 1: length},))
    source = save(model, tmp / "fp32.onnx")
    np.savez(tmp / "calib.npz", x=inputs(48, 9, 1))
    paths = {}
    for mode, settings in SETTINGS.items():
        out = tmp / mode
        args = ["compile", source, "-o", out, "--passes", "quantize", "--calib", tmp / "calib.npz"]
        for s in [*settings, "quantize.ends=true"]:
            args += ["--set", s]
        done = effc(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        paths[mode] = (source, out / "model.onnx")
    return paths


def weight_dequantizers(path) -> int:
    """DequantizeLinear nodes reading an integer initializer: the quantized weights."""
    model = onnx.load(str(path))
    ints = {i.name for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ints)


def ort_session(path, tmp_path=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if tmp_path is not None:
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mode", ["w8a8", "w4"])
def test_onnx_runtime_fuses_every_quantized_linear(compiled, mode, tmp_path):
    source, path = compiled[mode]
    quantized = weight_dequantizers(path)
    assert quantized == 5  # every linear (quantize.ends=true)
    ort_session(path, tmp_path)
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert sum(ops[op] for op in FUSED[mode]) == quantized, ops
    assert ops["MatMul"] == ops["Gemm"] == 0, ops
    # what is left of QDQ: one activation Q per static linear, and the int32 biases' DQ (constant)
    assert ops["QuantizeLinear"] == (quantized if mode == "w8a8" else 0), ops
    assert ops["DequantizeLinear"] == (quantized if mode == "w8a8" else 0), ops
    # norms, GELU and the residual Adds stay float (ORT fuses one Add + LayerNorm into SkipLayerNormalization)
    assert ops["LayerNormalization"] + ops["SkipLayerNormalization"] == 3 and ops["Gelu"] == 2, ops
    x = inputs(3, 7, 2)
    got, ref = ort_session(path).run(None, {"x": x})[0], ort_session(source).run(None, {"x": x})[0]
    assert got.shape == (3, 7, CLASSES)
    assert rel(got, ref) < (0.08 if mode == "w4" else 0.03)  # measured 0.054 (w4 block 32), 0.013 (w8a8)


@pytest.mark.parametrize("mode", ["w8a8", "w4"])
def test_openvino_runs_it_and_agrees_with_onnx_runtime(compiled, mode):
    ov = pytest.importorskip("openvino")
    source, path = compiled[mode]
    core = ov.Core()
    model = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert str(model.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    ort_q, ort_fp = ort_session(path), ort_session(source)
    for batch, length, seed in ((1, 9, 3), (3, 7, 4)):
        x = inputs(batch, length, seed)
        got = model({"x": x})[model.outputs[0]]
        ref, fp32 = ort_q.run(None, {"x": x})[0], ort_fp.run(None, {"x": x})[0]
        # Within int8 rounding: both engines read the same integer codes, so they may differ only where an
        # activation lands on the other side of a rounding step, and by float summation order. The measure:
        # relative L2 distance OpenVINO-ORT under 1e-3 and under a tenth of ORT's own distance to fp32
        # (the quantization error, 0.013 for w8a8 and 0.05 for w4 here); measured 0 (w8a8) and 1.4e-7 (w4).
        assert got.shape == ref.shape == (batch, length, CLASSES)
        quant_error = rel(ref, fp32)
        assert quant_error > 1e-3  # it did quantize
        assert rel(got, ref) < min(1e-3, 0.1 * quant_error), (rel(got, ref), quant_error)
