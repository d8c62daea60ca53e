"""ir.Model -> Relax IRModule through TVM's ONNX importer, with the weights kept apart.

Weights become trailing parameters of ``main`` (not constants folded into the code), so the build
can pre-pack them once at compile time and ship them in a params file next to model.so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import to_proto


@dataclass
class Imported:
    mod: object  # tvm.IRModule whose main takes (*inputs, *params)
    params: list[np.ndarray]  # values for main's trailing parameters, in order
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[str]
    output_names: list[str]
    custom_ops: list[dict] = field(default_factory=list)  # how each effc op node was lowered (custom_ops)
    custom_summary: str = ""


def _static_inputs(model: ir.Model) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    names, shapes, dtypes = [], [], []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dims = list(value.shape or [])
        if not all(isinstance(d, int) for d in dims):
            # Symbolic dims would leave every kernel shape-generic; the schedules need numbers.
            raise EffcError(f"input '{value.name}' has a symbolic shape {value.shape}: codegen needs static "
                            "shapes (export the model with fixed sizes)")
        names.append(value.name)
        shapes.append(tuple(dims))
        dtypes.append(str(value.dtype.numpy()) if value.dtype is not None else "float32")
    return names, shapes, dtypes


def unsupported_ops(model: ir.Model) -> list[str]:
    """Ops of ``model`` that TVM's importer has no converter for, or that it would silently misread.

    The importer ignores op domains, so a custom-domain op would be looked up by its bare name; such
    ops are reported here unless effc lowers them itself (the ops of effc.ops.registry: custom_ops).
    Standard ops that effc converts itself (custom_ops.OVERRIDES, e.g. Attention) are known to the
    importer by name already.
    """
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from effc.codegen.custom_ops import custom_op

    known = _get_convert_map()
    bad = set()
    for node in model.graph:
        if custom_op(node) is not None:
            continue
        if node.domain not in ("", "ai.onnx"):
            bad.add(f"{node.domain}.{node.op_type}")
        elif node.op_type not in known and node.op_type not in ("Constant", "If"):
            bad.add(node.op_type)
    return sorted(bad)


def import_model(model: ir.Model, target=None) -> Imported:
    """Import ``model`` into Relax for ``target`` (a tvm Target; default the host CPU, which decides
    how effc ops are lowered); raise EffcError naming every op TVM cannot import."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from effc.codegen.custom_ops import CustomOpLowering, importer_hook
    from effc.codegen.layernorm_stats import expose_layernorm_stats
    from effc.codegen.int4_lowering import Int4Lowering
    from effc.codegen.qdq_lowering import QdqLowering

    bad = unsupported_ops(model)
    if bad:
        raise EffcError(f"TVM's ONNX importer cannot handle: {', '.join(bad)}")
    names, shapes, dtypes = _static_inputs(model)
    if target is None:
        from effc.codegen.target import llvm_target

        target = llvm_target().tvm()
    lowering = CustomOpLowering(model, target)
    # QDQ matmuls -> integer matmuls (effc.codegen.qdq_lowering), int4 weight-only (int4_lowering)
    quantized = [QdqLowering(target), Int4Lowering(target)]
    proto = expose_layernorm_stats(lowering.rewrite(to_proto(model)))
    for low in quantized:
        proto = low.rewrite(proto)
    proto = _integer_initializers_as_constants(proto)
    try:
        with lowering.converters(), importer_hook({k: v for low in quantized for k, v in low.table().items()}):
            mod = from_onnx(proto, shape_dict=dict(zip(names, shapes)), dtype_dict=dict(zip(names, dtypes)),
                            keep_params_in_input=True, sanitize_input_names=False)
    except EffcError:
        raise
    except Exception as exc:  # the importer raises assorted types on ops/attributes it cannot convert
        first = str(exc).strip().splitlines()
        raise EffcError(f"TVM cannot import the model ({type(exc).__name__}: {first[0][:200] if first else ''})") \
            from None
    mod, params = relax.frontend.detach_params(mod)
    mod, values = lowering.attach(mod, [p.numpy() for p in params.get("main", [])])
    for low in quantized:
        mod, values = low.attach(mod, values)
    mod, values = bind_scalars(mod, values)
    summary = "\n".join(s for s in [lowering.summary()] + [low.summary() for low in quantized] if s)
    return Imported(mod, values, names, shapes, dtypes, [v.name for v in model.graph.outputs],
                    lowering.report() + [r for low in quantized for r in low.report()], summary)


def _integer_initializers_as_constants(proto):
    """Integer initializers (shapes, axes, indices) become Constant nodes.

    With keep_params_in_input every initializer reaches Relax as a parameter, so an Expand or
    Reshape whose shape is an initializer gets a shape only known at run time (MiniLM's pooling
    Expand, llama's masks): symbolic kernels that neither the CPU rules nor the VM's shape lowering
    for CUDA can handle. As constants the importer reads their values and shapes stay static."""
    from onnx import TensorProto, helper

    graph = proto.graph
    integer = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8,
               TensorProto.BOOL}
    moved = [t for t in graph.initializer if t.data_type in integer]
    if not moved:
        return proto
    names = {t.name for t in moved}
    constants = [helper.make_node("Constant", [], [t.name], name=f"effc_const_{i}", value=t)
                 for i, t in enumerate(moved)]
    kept = [t for t in graph.initializer if t.name not in names]
    inputs = [i for i in graph.input if i.name not in names]
    nodes = constants + list(graph.node)
    del graph.initializer[:], graph.input[:], graph.node[:]
    graph.initializer.extend(kept)
    graph.input.extend(inputs)
    graph.node.extend(nodes)
    return proto


def bind_scalars(mod, values: list[np.ndarray]):
    """Bind one-element params (GELU's 0.5 and 3.0, a softmax scale) into ``main`` as constants.

    As params they reach the kernels as buffer loads (`pow(x, c[()])`), which hides the exponent from
    the fast-math rewrite and costs a load per element; as constants they fold into the code."""
    from tvm import relax

    func = mod["main"]
    num_inputs = len(func.params) - len(values)
    bound, kept = {}, []
    for var, value in zip(func.params[num_inputs:], values):
        (bound.__setitem__(var, value) if value.size == 1 else kept.append(value))
    if not bound:
        return mod, values
    return relax.transform.BindParams("main", bound)(mod), kept
