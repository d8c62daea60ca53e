"""Model size and cost estimates recorded before and after each pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from effc.ir import to_proto


def param_stats(model: ir.Model) -> tuple[int, int]:
    """(parameter count, bytes) over initializers and Constant nodes of the main graph."""
    count = nbytes = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            count += int(np.prod(value.const_value.shape.numpy() if hasattr(value.const_value.shape, "numpy") else value.const_value.shape))
            nbytes += value.const_value.nbytes
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            count += int(np.prod(tuple(tensor.shape)))
            nbytes += tensor.nbytes
    return count, nbytes


def _shape_of(proto_values: dict[str, onnx.ValueInfoProto], name: str) -> list[int] | None:
    info = proto_values.get(name)
    if info is None or not info.type.HasField("tensor_type"):
        return None
    dims = []
    for d in info.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return dims


def flops(model: ir.Model, input_shapes: dict[str, list[int]]) -> int:
    """FLOPs estimate for one inference at ``input_shapes``: MACs x2 for MatMul/Gemm/Conv,
    one per output element for everything else."""
    proto = to_proto(model)
    for inp in proto.graph.input:
        if inp.name in input_shapes:
            shape = inp.type.tensor_type.shape
            for dim, size in zip(shape.dim, input_shapes[inp.name]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        return 0
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    for init in proto.graph.initializer:
        known.setdefault(init.name, onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    total = 0
    for node in proto.graph.node:
        out = _shape_of(known, node.output[0]) if node.output else None
        if out is None:
            continue
        out_elems = int(np.prod(out)) if out else 1
        if node.op_type == "MatMul":
            a = _shape_of(known, node.input[0])
            total += 2 * out_elems * (a[-1] if a else 1)
        elif node.op_type == "Gemm":
            a = _shape_of(known, node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = (a[0] if trans_a else a[-1]) if a else 1
            total += 2 * out_elems * k
        elif node.op_type in ("Conv", "ConvTranspose"):
            w = _shape_of(known, node.input[1])
            total += 2 * out_elems * (int(np.prod(w[1:])) if w else 1)
        elif node.op_type not in ("Constant", "Shape", "Reshape", "Identity", "Unsqueeze", "Squeeze"):
            total += out_elems
    return total
