"""Small QDQ models for the int8/int4 lowering tests: float models built with onnx.helper, quantized
by ONNX Runtime's own tool (quantize_static: QDQ format, u8 activations, per-channel s8 weights,
MinMax) or, for int4, with a hand-made blocked DequantizeLinear (opset 21)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def x_to_y(nodes, name: str, x_shape, y_shape, inits, opset: int = 20, ir_version: int = 9) -> onnx.ModelProto:
    """A float model of one input x and one output y (shapes given) from ``nodes`` and ``inits``."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


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
    return x_to_y(nodes, "mlp", shape, shape, inits)


def calibration(shape, count: int = 4, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) + 0.7).astype(np.float32) for _ in range(count)]


def quantize_qdq(model: onnx.ModelProto, path, samples: list[np.ndarray], op_types=("MatMul",),
                 per_channel: bool = True, activation: str = "u8", symmetric: bool = False) -> str:
    """``model`` quantized by ORT's quantize_static into ``path`` (QDQ, MinMax, s8 weights);
    ``symmetric``: activation zero points 0 (s8) or 128 (u8)."""
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
                      calibrate_method=q.CalibrationMethod.MinMax,
                      extra_options={"ActivationSymmetric": True} if symmetric else None)
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
    return x_to_y(nodes, "w4", [*m_rows, k], [*m_rows, n], inits, opset=21, ir_version=10)


def float_attention(batch: int = 2, seq: int = 9, heads: int = 3, head_dim: int = 8, seed: int = 0,
                    mask: bool | str = True, fused_qkv: bool = False) -> onnx.ModelProto:
    """x[batch, seq, heads * head_dim] -> LayerNorm -> q, k, v projections (+ bias) -> heads ->
    softmax(q k^T * scale + mask) v -> merge -> output projection + bias + x: the attention of an
    exported ViT/BERT, whose two activation x activation MatMuls quantize_static gives DQ on both
    inputs. ``mask``: True (the last key masked), False (none) or "zero" (a constant 0 added, as an
    exported ViT does, or "causal": GPT-2's lower triangle). ``fused_qkv``: one projection to
    3 * dim split into q, k and v, as GPT-2's c_attn is."""
    rng = np.random.default_rng(seed)
    dim = heads * head_dim
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(name, h):
        w = const(f"W{name}", (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32))
        b = const(f"b{name}", (rng.standard_normal(dim) * 0.1).astype(np.float32))
        return node("Add", [node("MatMul", [h, w], name), b], f"{name}_bias")

    heads_shape = const("heads_shape", np.array([batch, seq, heads, head_dim], np.int64))
    flat_shape = const("flat_shape", np.array([batch, seq, dim], np.int64))
    h = node("LayerNormalization", ["x", const("ln_w", np.ones(dim, np.float32)),
                                     const("ln_b", np.zeros(dim, np.float32))], "ln", axis=-1)
    if fused_qkv:
        w = const("Wqkv", (rng.standard_normal((dim, 3 * dim)) / np.sqrt(dim)).astype(np.float32))
        b = const("bqkv", (rng.standard_normal(3 * dim) * 0.1).astype(np.float32))
        qkv = node("Add", [node("MatMul", [h, w], "qkv"), b], "qkv_bias")
        nodes.append(helper.make_node("Split", [qkv, const("qkv_split", np.array([dim] * 3, np.int64))],
                                      ["q_bias", "k_bias", "v_bias"], name="split", axis=-1))
        q, k, v = "q_bias", "k_bias", "v_bias"
    else:
        q, k, v = (linear(n, h) for n in "qkv")
    qh = node("Transpose", [node("Reshape", [q, heads_shape], "q4")], "qh", perm=[0, 2, 1, 3])
    kh = node("Transpose", [node("Reshape", [k, heads_shape], "k4")], "kh", perm=[0, 2, 3, 1])
    vh = node("Transpose", [node("Reshape", [v, heads_shape], "v4")], "vh", perm=[0, 2, 1, 3])
    scores = node("Mul", [node("MatMul", [qh, kh], "qk"), const("scale", np.float32(head_dim ** -0.5))], "scores")
    if mask:  # the last key masked out, as padding would be
        bias = np.zeros((1, 1, seq, seq) if mask in ("zero", "causal") else (1, 1, 1, seq), np.float32)
        if mask == "causal":
            bias[0, 0][np.triu_indices(seq, 1)] = -1e4
        elif mask != "zero":
            bias[..., -1] = -1e4
        scores = node("Add", [scores, const("mask", bias)], "masked")
    attn = node("MatMul", [node("Softmax", [scores], "probs", axis=-1), vh], "pv")
    merged = node("Reshape", [node("Transpose", [attn], "attn_t", perm=[0, 2, 1, 3]), flat_shape], "merged")
    node("Add", ["x", linear("o", merged)], "y")
    shape = [batch, seq, dim]
    return x_to_y(nodes, "attention", shape, shape, inits, opset=17)
