"""Emit quantized linears in ONNX Runtime's QDQ conventions, so its graph optimizer fuses them.

Every quantized linear becomes MatMul(A, DequantizeLinear(W_q)) (+ Add bias) with W_q the
integer weight in MatMul's [K, N] layout (a Gemm becomes the same MatMul + Add):

- static (w8a8): A = DequantizeLinear(QuantizeLinear(x)), one QuantizeLinear per activation
  shared by the linears that read it, one DequantizeLinear per linear; int8 weights per output
  channel (axis 1); the bias as int32 + DequantizeLinear at scale s_x * s_w, shaped [1, .., 1, N]
  to the activation's rank. ONNX Runtime: DQ, DQ -> MatMul => MatMulIntegerToFloat (QLinearMatMul
  when a Q follows). Its MatMulAddFusion turns MatMul + Add of a [N] / [1, N] bias into a float
  Gemm first, so a linear on a 2-D activation with a bias runs in float there (known gap).
- dynamic (w8a8-dynamic): DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp, w_zp)
  -> Cast -> Mul(x_scale * w_scale): what ONNX Runtime fuses into DynamicQuantizeMatMul.
- weight-only (w8, w4): A = x; W_q per output channel, or blocked along K (opset 21
  ``block_size``; int4 blocked on axis 0 is what ONNX Runtime fuses into MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from effc.ir import consumers, new_initializer
from effc.passes._linears import Linear
from effc.passes._qparams import ActParams, QuantWeight, bias_codes, bias_scale

STATIC, DYNAMIC, WEIGHT_ONLY = "static", "dynamic", "weight-only"


@dataclass
class LayerPlan:
    """One linear's quantization: its weight, its input's parameters (static) and the scheme."""

    lin: Linear
    weight: QuantWeight
    act: ActParams | None
    scheme: str

    @property
    def name(self) -> str:
        return self.lin.name


def _const(graph: ir.Graph, array: np.ndarray, hint: str, dtype: ir.DataType | None = None) -> ir.Value:
    if dtype is None:
        return new_initializer(graph, np.ascontiguousarray(array), hint)
    name, i = hint, 0
    while name in graph.initializers:
        i += 1
        name = f"{hint}_{i}"
    tensor = ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _node(op: str, inputs: list, name: str, outputs: int = 1, **attrs) -> ir.Node:
    attributes = [ir.AttrInt64(k, int(v)) for k, v in attrs.items()]
    return ir.Node("", op, inputs, attributes=attributes, name=name, num_outputs=outputs)


def _weight_consts(graph: ir.Graph, plan: LayerPlan) -> tuple[ir.Value, ir.Value, dict[str, int]]:
    """The integer weight [K, N], its scales and the DequantizeLinear attributes: per output
    channel (axis 1, scales [N]) or blocked along K (axis 0, scales [K / block, N])."""
    w, name = plan.weight, plan.name
    codes = w.codes.T  # [K, N]
    if w.bits == 4:
        data = _const(graph, codes.astype(ml_dtypes.int4), f"{name}.weight_q", ir.DataType.INT4)
    else:
        data = _const(graph, codes.astype(np.int8), f"{name}.weight_q")
    if w.group == codes.shape[0]:
        return data, _const(graph, w.scale[0], f"{name}.weight_scale"), {"axis": 1}
    return data, _const(graph, w.scale, f"{name}.weight_scale"), {"axis": 0, "block_size": w.group}


def _act_q(graph: ir.Graph, x: ir.Value, act: ActParams, anchor: ir.Node) -> ir.Value:
    """The QuantizeLinear of ``x`` with ``act``, shared by every linear reading ``x``: reused when
    an earlier linear made it (found by name, so this works on copies of the model too)."""
    qname = f"{x.name}.quantize"
    for reader in consumers(x):
        if reader.op_type == "QuantizeLinear" and reader.name == qname:
            return reader.outputs[0]
    scale = _const(graph, np.array(act.scale, np.float32), f"{x.name}.scale")
    zp = _const(graph, np.array(act.zero_point, act.dtype), f"{x.name}.zero_point")
    node = _node("QuantizeLinear", [x, scale, zp], qname)
    node.outputs[0].name = f"{x.name}_quantized"
    node.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(act.dtype))
    node.outputs[0].shape = x.shape
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph[0], node)
    return node.outputs[0]


def rewrite_layer(graph: ir.Graph, plan: LayerPlan) -> None:
    """Replace ``plan``'s linear (and its bias Add) by its quantized form, keeping the output's name."""
    lin, name = plan.lin, plan.name
    w_int, w_scale, w_attrs = _weight_consts(graph, plan)
    bias = lin.bias
    if plan.scheme == DYNAMIC:
        dql = _node("DynamicQuantizeLinear", [lin.x], f"{name}.input_quantize", outputs=3)
        wzp = _const(graph, np.zeros(plan.weight.scale.shape[1], np.int8), f"{name}.weight_zero_point")
        mmi = _node("MatMulInteger", [dql.outputs[0], w_int, dql.outputs[2], wzp], f"{name}.matmul_integer")
        scale = _node("Mul", [dql.outputs[1], w_scale], f"{name}.output_scale")
        cast = _node("Cast", [mmi.outputs[0]], f"{name}.cast", to=ir.DataType.FLOAT)
        mul = _node("Mul", [cast.outputs[0], scale.outputs[0]], f"{name}.rescale")
        nodes = [dql, mmi, scale, cast, mul]
        y = mul.outputs[0]
    else:
        dq_w = _node("DequantizeLinear", [w_int, w_scale], f"{name}.weight_dq", **w_attrs)
        nodes = [dq_w]
        a = lin.x
        if plan.scheme == STATIC:
            q = _act_q(graph, lin.x, plan.act, lin.node)
            zp_value = q.producer().inputs[2]
            dq_x = _node("DequantizeLinear", [q, q.producer().inputs[1], zp_value], f"{name}.input_dq")
            nodes.insert(0, dq_x)
            a = dq_x.outputs[0]
        mm = _node("MatMul", [a, dq_w.outputs[0]], f"{name}.matmul")
        nodes.append(mm)
        y = mm.outputs[0]
    if bias is not None:
        # A bias of the activation's rank: ONNX Runtime fuses MatMul + Add of a [N] or [1, N] bias into a
        # float Gemm before its QDQ fusions run, which would leave the layer in float.
        rank = len(lin.x.shape) if lin.x.shape is not None else 1
        shape = [1] * (max(rank, 1) - 1) + [len(bias)]
        bias_value = None
        if plan.scheme == STATIC:
            codes = bias_codes(bias, plan.act, plan.weight)
            if codes is not None:
                b_int = _const(graph, codes.reshape(shape), f"{name}.bias_q")
                b_scale = _const(graph, bias_scale(plan.act, plan.weight), f"{name}.bias_scale")
                b_dq = _node("DequantizeLinear", [b_int, b_scale], f"{name}.bias_dq", axis=len(shape) - 1)
                nodes.append(b_dq)
                bias_value = b_dq.outputs[0]
        if bias_value is None:
            bias_value = _const(graph, bias.astype(np.float32).reshape(shape), f"{name}.bias")
        add = _node("Add", [y, bias_value], f"{name}.bias_add")
        nodes.append(add)
        y = add.outputs[0]
    old = lin.output
    y.shape, y.type = old.shape, old.type
    last = lin.bias_add or lin.node
    for node in reversed(nodes):
        graph.insert_after(last, node)
    if old.is_graph_output():  # keep the model's output name
        out_name = old.name
        graph.outputs[graph.outputs.index(old)] = y
        old.name = f"{out_name}_float"
        y.name = out_name
    else:
        y.name = f"{old.name}_q"
    old.replace_all_uses_with(y)
    graph.remove([lin.node] + ([lin.bias_add] if lin.bias_add else []), safe=True)
