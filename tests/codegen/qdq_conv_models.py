"""Small float conv models for the int8 conv tests (quantized by tests.codegen.qdq_models.quantize_qdq,
ONNX Runtime's quantize_static)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def float_conv(batch: int, channels: int, out_channels: int, spatial: tuple, kernel: int, stride: int = 1,
               pad: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True, relu: bool = True,
               residual: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[batch, channels, *spatial] -> Conv (+ b) (-> Relu) (-> + x) -> y; 1-D or 2-D by len(spatial)."""
    rng = np.random.default_rng(seed)
    dims = len(spatial)
    w = rng.standard_normal((out_channels, channels // groups, *[kernel] * dims)) / np.sqrt(channels * kernel ** dims)
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(out_channels) * 0.1).astype(np.float32), "b"))
        inputs.append("b")
    ops = ["conv"] + (["relu"] if relu else []) + (["residual"] if residual else [])
    outs = ops[:-1] + ["y"]
    nodes = [helper.make_node("Conv", inputs, [outs[0]], name="conv", kernel_shape=[kernel] * dims,
                              strides=[stride] * dims, pads=[pad] * 2 * dims, dilations=[dilation] * dims,
                              group=groups)]
    if relu:
        nodes.append(helper.make_node("Relu", [outs[0]], [outs[1]], name="relu"))
    if residual:
        nodes.append(helper.make_node("Add", [outs[-2], "x"], ["y"], name="residual"))
    out = [(s + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for s in spatial]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [batch, channels, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_channels, *out])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model
