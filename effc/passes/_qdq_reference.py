"""effc's own numpy reference of a quantized model: the QDQ graph evaluated op by op as the ONNX
specification defines QuantizeLinear / DequantizeLinear (blocked too) / DynamicQuantizeLinear /
MatMulInteger, without any engine's fusions. It covers the ops the quantize pass emits around
linears and the elementwise ops of small test models; anything else is refused (KeyError)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir import const_value
from effc.passes._qparams import dynamic_params, quantize_act, ActParams


def _quantize(x, scale, zp=None):
    dtype = np.uint8 if zp is None or zp.dtype == np.uint8 else zp.dtype
    zp_val = 0 if zp is None else int(np.asarray(zp).reshape(-1)[0])
    return quantize_act(x, ActParams(float(np.asarray(scale).reshape(-1)[0]), zp_val, np.dtype(dtype) == np.int8, 1.0))


def _dequantize(node, q, scale, zp=None):
    q = q.astype(np.float32)
    if zp is not None:
        q = q - zp.astype(np.float32)
    if scale.size == 1:
        return (q * scale.reshape(())).astype(np.float32)
    axis = node.attributes.get_int("axis", 1) % q.ndim
    block = node.attributes.get_int("block_size", 0)
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    else:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return (q * scale).astype(np.float32)


def _dynamic(x):
    p = dynamic_params(x)
    return quantize_act(x, p), np.float32(p.scale), np.uint8(p.zero_point)


def _matmul_integer(a, b, a_zp=None, b_zp=None):
    a = a.astype(np.int64) - (0 if a_zp is None else a_zp.astype(np.int64))
    b = b.astype(np.int64) - (0 if b_zp is None else b_zp.astype(np.int64))
    return np.matmul(a, b).astype(np.int32)


OPS = {
    "QuantizeLinear": lambda n, x, s, zp=None: _quantize(x, s, zp),
    "DequantizeLinear": _dequantize,
    "DynamicQuantizeLinear": lambda n, x: _dynamic(x),
    "MatMulInteger": lambda n, *a: _matmul_integer(*a),
    "MatMul": lambda n, a, b: np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.float32),
    "Add": lambda n, a, b: (a + b).astype(np.float32),
    "Mul": lambda n, a, b: (a * b).astype(np.float32),
    "Relu": lambda n, x: np.maximum(x, 0).astype(x.dtype),
    "Cast": lambda n, x: x.astype(ir.DataType(n.attributes.get_int("to")).numpy()),
}


def run_reference(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs on ``feed``, computed in numpy op by op."""
    env: dict[str, np.ndarray] = {}
    for v in model.graph.inputs:
        env[v.name] = np.asarray(feed[v.name])
    for node in model.graph:
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
            elif v.name in env:
                args.append(env[v.name])
            else:
                args.append(const_value(v))
        while args and args[-1] is None:
            args.pop()
        out = OPS[node.op_type](node, *args)
        outs = out if isinstance(out, tuple) else (out,)
        for v, o in zip(node.outputs, outs):
            env[v.name] = np.asarray(o)
    return {v.name: env[v.name] for v in model.graph.outputs}
