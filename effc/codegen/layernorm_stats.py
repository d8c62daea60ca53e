"""LayerNormalization's optional Mean and InvStdDev outputs, computed from ONNX ops before import.

TVM 0.27's importer converts LayerNormalization to ``relax.op.nn.layer_norm`` and returns 0-d zero
placeholders for the node's second and third outputs, so a model reading them would get 0.0. Where
a model reads them, this rewrite keeps the node for Y only and computes the statistics as ONNX's
own function body for the op does: in the stash type (float32 by default), over the axes from
``axis`` to the last, ``InvStdDev = 1 / sqrt(mean((x - mean)^2) + epsilon)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from effc.errors import EffcError


def expose_layernorm_stats(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``proto`` in place so that no LayerNormalization reads out Mean or InvStdDev."""
    graph = proto.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    types = _value_types(graph)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.output) < 2:
            continue
        stats = [name if name in read else "" for name in list(node.output[1:3]) + [""] * (3 - len(node.output))]
        del node.output[1:]
        if any(stats):
            nodes += _statistics(node, stats, types, opset, graph)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _statistics(node: onnx.NodeProto, stats: list[str], types: dict[str, tuple[int, int | None]], opset: int,
                graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes writing ``stats`` (Mean, InvStdDev names; '' for one nobody reads) of ``node``."""
    x = node.input[0]
    elem, rank = types.get(x, (TensorProto.FLOAT, None))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, epsilon = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
    stash = int(attrs.get("stash_type", TensorProto.FLOAT))
    if axis >= 0 and rank is None:
        raise EffcError(f"LayerNormalization '{node.name}': its Mean/InvStdDev outputs need the input's rank")
    axes = list(range(axis, rank)) if axis >= 0 else list(range(axis, 0))
    prefix = f"{node.name or node.output[0]}/stats"
    made: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], output: str = "", **attributes) -> str:
        output = output or f"{prefix}/{op.lower()}_{len(made)}"
        made.append(helper.make_node(op, inputs, [output], name=f"{prefix}/{op.lower()}_{len(made)}", **attributes))
        return output

    def constant(name: str, array: np.ndarray) -> str:
        made.append(helper.make_node("Constant", [], [f"{prefix}/{name}"], name=f"{prefix}/{name}",
                                     value=numpy_helper.from_array(array, f"{prefix}/{name}")))
        return f"{prefix}/{name}"

    def mean(value: str, output: str = "") -> str:
        if opset >= 18:
            return add("ReduceMean", [value, constant(f"axes_{len(made)}", np.array(axes, np.int64))], output,
                       keepdims=1)
        return add("ReduceMean", [value], output, axes=axes, keepdims=1)

    xs = add("Cast", [x], to=stash) if elem != stash else x
    mu = mean(xs, stats[0])
    if stats[1]:
        centred = add("Sub", [xs, mu])
        variance = mean(add("Mul", [centred, centred]))
        eps = constant("epsilon", np.array(epsilon, helper.tensor_dtype_to_np_dtype(stash)))
        add("Reciprocal", [add("Sqrt", [add("Add", [variance, eps])])], stats[1])
    return made


def _value_types(graph: onnx.GraphProto) -> dict[str, tuple[int, int | None]]:
    """Element type and rank (None if unknown) of every typed value of ``graph``."""
    types = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = info.type.tensor_type
        types[info.name] = (tensor.elem_type, len(tensor.shape.dim) if tensor.HasField("shape") else None)
    for init in graph.initializer:
        types[init.name] = (init.data_type, len(init.dims))
    return types
