"""Small QDQ models for the int8/int4 lowering tests: float models built with onnx.helper, quantized
by ONNX Runtime's own tool (quantize_static: QDQ format, u8 activations, per-channel s8 weights,
MinMax) or, for int4, with a hand-made blocked DequantizeLinear (opset 21)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def float_mlp(batch: int, rows: tuple, k: int, hidden: int, seed: int = 0, gelu: bool = True) -> onnx.ModelProto:
    """x[batch, *rows, k] -> MatMul W1 + b1 -> Gelu -> MatMul W2 + b2 -> + x (residual) -> y.
    Inputs are shifted positive so MinMax calibration gives nonzero activation zero points."""
    rng = np.random.default_rng(seed)
    shape = [batch, *rows, k]
    inits = [numpy_helper.from_array((rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array((rng.standard_normal((hidden, k)) / np.sqrt(hidden)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32) * 0.1, "b2")]
    act = helper.make_node("Gelu", ["h1"], ["a1"], name="act") if gelu else helper.make_node("Relu", ["h1"], ["a1"])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["h1"], name="fc1_bias"), act,
             helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["h2"], name="fc2_bias"),
             helper.make_node("Add", ["h2", "x"], ["y"], name="residual")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def calibration(shape, count: int = 4, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) + 0.7).astype(np.float32) for _ in range(count)]


def quantize_qdq(model: onnx.ModelProto, path, samples: list[np.ndarray], op_types=("MatMul",),
                 per_channel: bool = True, activation: str = "u8") -> str:
    """``model`` quantized by ORT's quantize_static into ``path`` (QDQ, MinMax, s8 weights)."""
    import onnxruntime.quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": s} for s in samples])

        def get_next(self):
            return next(self.items, None)

    src = str(path) + ".float.onnx"
    onnx.save(model, src)
    q.quantize_static(src, str(path), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                      activation_type=q.QuantType.QUInt8 if activation == "u8" else q.QuantType.QInt8,
                      weight_type=q.QuantType.QInt8, op_types_to_quantize=list(op_types),
                      calibrate_method=q.CalibrationMethod.MinMax)
    return str(path)


def int4_matmul(m_rows: tuple, k: int, n: int, block: int = 32, seed: int = 0, signed: bool = False,
                zero_points: bool = True) -> onnx.ModelProto:
    """x[*m_rows, k] -> MatMul(x, DQ(W int4 [k, n], scale [k/block, n], block on axis 0)) + b -> y
    (opset 21 blocked DequantizeLinear: the form ONNX Runtime turns into MatMulNBits)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    dtype, lo, hi = (TensorProto.INT4, -8, 8) if signed else (TensorProto.UINT4, 0, 16)
    w = rng.integers(lo, hi, size=(k, n))
    scale = (rng.random((blocks, n)) * 0.05 + 0.01).astype(np.float32)
    inits = [helper.make_tensor("Wq", dtype, [k, n], w.flatten().tolist()),
             numpy_helper.from_array(scale, "Ws"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, "b")]
    dq_inputs = ["Wq", "Ws"]
    if zero_points:
        zp = rng.integers(lo, hi, size=(blocks, n))
        inits.append(helper.make_tensor("Wz", dtype, [blocks, n], zp.flatten().tolist()))
        dq_inputs.append("Wz")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["W"], name="dq_w", axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias")]
    graph = helper.make_graph(nodes, "w4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*m_rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*m_rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model
