"""Lower every registered effc op (effc.ops.registry) while TVM imports a model: the one importer hook.

Plan: each node of a registered op is checked (a malformed node is an EffcError) and then takes its
op's kernel on this target unless there is none for the target kind, a packed input is not a
constant, or the op's fit test gives a reason; the reason goes to the manifest (``custom_ops``).
Rewrite: kernel nodes are renamed to a private op, their packed inputs dropped (their values travel
in this object); every other node of a registered op has its ONNX function body inlined, which TVM
compiles like any graph (constants folded at compile time).
Hook: TVM 0.27's importer looks converters up by bare op name in ``onnx_frontend._get_convert_map()``
and takes no custom converters, so while importing, that function is wrapped to add effc's (restored
afterwards, even on error): the private op, and effc's overrides of standard ops (:data:`OVERRIDES`).
The converter sees each input as the importer's own Relax value with its static shape, so a kernel
is chosen by shape and its arguments reshaped or padded in place; cutting the nodes out and splicing
calls back into the imported dataflow block would mean rebuilding the block by hand.
Attach: the packed weights become trailing parameters of main, so they ship in params.bin.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import const_value
from effc.ops import registry
from effc.ops.registry import CustomOp, Kernel, TargetKernels

PRIVATE_OP = "EffcKernelCall"  # what kernel nodes are renamed to for the importer
INDEX_ATTR = "effc_index"


@dataclass(frozen=True)
class Override:
    """effc's converter for a standard op that TVM's importer gets wrong or lacks."""

    op_type: str
    since: int  # the first opset of the op's form that ``convert`` handles
    convert: Callable  # (bb, inputs, attr) -> relax expression
    check: Callable[[ir.Model], None]  # EffcError (one line, naming the node) for what it cannot lower


OVERRIDES = ("effc.codegen.attention_lowering:OVERRIDE",)  # "module:attribute", imported when importing


def overrides() -> list[Override]:
    found = []
    for entry in OVERRIDES:
        module, _, attribute = entry.partition(":")
        found.append(getattr(importlib.import_module(module), attribute))
    return found


def custom_op(node) -> CustomOp | None:
    """The registered effc op ``node`` (an ir.Node or a NodeProto) is, or None."""
    return registry.lookup(node.domain, node.op_type)


@dataclass
class Lowering:
    """One node's entry in the manifest's ``custom_ops``."""

    node: str
    lowering: str  # the op's rule label, or its fallback label
    reason: str = ""  # why the fallback
    kernel: str | None = None  # the PrimFunc's symbol (kernel nodes)


@dataclass
class _Planned:
    op: CustomOp
    low: Lowering
    kernels: TargetKernels
    constants: list[np.ndarray]
    attributes: dict  # the node's attribute values, for kernels built with context


class CustomOpLowering:
    """Plans every registered-op node of ``model`` for ``target`` (a tvm Target), rewrites the ONNX
    proto accordingly and converts the kernel nodes during import."""

    def __init__(self, model: ir.Model, target):
        for override in overrides():
            override.check(model)
        kind = target.kind.name
        self.lowerings: list[tuple[CustomOp, Lowering]] = []
        self._count = len(model.graph)
        self._planned: dict[int, _Planned] = {}  # top-level node index ->
        self._lifted: list[tuple[object, np.ndarray]] = []  # (relax Var, packed array), in call order
        self._symbols: dict[str, object] = {}
        self._target = target
        for i, node in enumerate(model.graph):
            op = custom_op(node)
            if op is None:
                continue
            low = Lowering(node.name or f"{op.name}_{i}", op.rule)
            inputs = list(node.inputs)
            constants = [const_value(inputs[p]) if p < len(inputs) else None for p in op.packed]
            if op.check is not None:
                op.check(low.node, node, constants)
            kernels = op.kernels(kind)
            if kernels is None:
                low.reason = f"no {kind} kernel yet"
            elif any(c is None for c in constants):
                low.reason = "packed inputs are not constants"
            else:
                low.reason = kernels.fit(node, constants, target) or ""
            if low.reason:
                low.lowering = op.fallback
            else:
                attributes = {name: attr.value for name, attr in node.attributes.items()}
                self._planned[i] = _Planned(op, low, kernels, constants, attributes)
            self.lowerings.append((op, low))

    # --- before import: the proto ---------------------------------------------------------

    def rewrite(self, proto):
        """Rename kernel nodes to the private op (packed inputs dropped) and inline the function
        body of every other registered-op node, subgraphs included."""
        import onnx
        import onnx.inliner

        nodes = proto.graph.node
        if len(nodes) != self._count:
            raise EffcError("internal: the serialised graph does not match the model's nodes")
        for i, plan in self._planned.items():
            node = nodes[i]
            node.op_type = PRIVATE_OP
            for position in sorted(plan.op.packed, reverse=True):
                del node.input[position]
            node.attribute.append(onnx.helper.make_attribute(INDEX_ATTR, i))
        left = _registered_calls(proto)
        if left:
            proto = onnx.inliner.inline_selected_functions(proto, sorted(left), exclude=False)
        return proto

    # --- during import: the converters ----------------------------------------------------

    @contextlib.contextmanager
    def converters(self):
        """Make TVM's importer convert the private op and the overridden standard ops while in the block."""
        table = {PRIVATE_OP: (1, self._convert)}
        table.update({o.op_type: (o.since, o.convert) for o in overrides()})
        with importer_hook(table):
            yield

    def _convert(self, bb, inputs, attr):
        from tvm import relax

        plan = self._planned[attr[INDEX_ATTR]]
        inputs = list(inputs)
        try:
            shapes = [tuple(int(d) for d in x.ty.shape) for x in inputs]
            context = (plan.attributes, self._target) if plan.kernels.context else ()
            kernel = plan.kernels.build(shapes, plan.constants, *context)
            plan.low.kernel = kernel.symbol
            gv = self._symbols.get(kernel.symbol)
            if gv is None:
                # No global_symbol: the build names it after the GlobalVar, and TVM's dead-code removal
                # drops stale copies only of non-exported functions. is_scheduled: the rules skip it;
                # op_pattern 8 (opaque): nothing is fused into it.
                func = _rooted(kernel.func).without_attr("global_symbol").with_attrs(
                    {"tirx.is_scheduled": 1, "op_pattern": 8, "effc.rule": plan.op.rule})
                gv = self._symbols[kernel.symbol] = bb.add_func(func, kernel.symbol)
            weights = []
            for j, array in enumerate(kernel.weights):
                var = relax.Var(f"{plan.low.node}.packed{j}", relax.TensorType(list(array.shape), str(array.dtype)))
                self._lifted.append((var, array))  # free here; attach() makes it a parameter of main
                weights.append(var)
            return (plan.kernels.call or call_kernel)(bb, gv, kernel, inputs, weights)
        except EffcError as exc:
            raise EffcError(f"{plan.low.node}: {exc}") from None

    # --- after import ---------------------------------------------------------------------

    def attach(self, mod, values: list[np.ndarray]):
        """Append the packed weights as trailing parameters of main: (module, values)."""
        from tvm import relax

        if not self._lifted:
            return mod, values
        main = mod["main"]
        func = relax.Function(list(main.params) + [v for v, _ in self._lifted], main.body, main.ret_ty,
                              main.is_pure, main.attrs)
        mod["main"] = func
        return mod, list(values) + [a for _, a in self._lifted]

    def report(self) -> list[dict]:
        return [vars(low) for _, low in self.lowerings]

    def summary(self) -> str:
        lines = []
        for op in dict.fromkeys(op for op, _ in self.lowerings):
            lows = [low for o, low in self.lowerings if o is op]
            taken = sum(low.lowering == op.rule for low in lows)
            other = {low.reason for low in lows if low.lowering != op.rule}
            text = f"{op.name}: {taken} of {len(lows)} on the {op.rule} kernels"
            lines.append(text + (f"; {op.fallback} fallback ({'; '.join(sorted(other))})" if other else ""))
        return "\n".join(lines)


def call_kernel(bb, gv, kernel: Kernel, inputs: list, weights: list):
    """The default call: ``kernel.func(*inputs, *weights, out)``, out being the PrimFunc's last buffer."""
    from tvm import relax

    out = kernel.func.params[-1]  # TVM 0.27: a PrimFunc's parameter is its buffer
    return relax.call_tir(gv, [*inputs, *weights], relax.TensorType([int(d) for d in out.shape], str(out.dtype)))


@contextlib.contextmanager
def importer_hook(table: dict[str, tuple[int, Callable]]):
    """While in the block, TVM's importer converts each op named in ``table`` with its
    ``(since opset, convert(bb, inputs, attr))``."""
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    original = frontend._get_convert_map
    converters = {name: _converter_class(frontend.OnnxOpConverter, name, since, convert)
                  for name, (since, convert) in table.items()}

    def extended():
        return {**original(), **converters}

    frontend._get_convert_map = extended
    try:
        yield
    finally:
        frontend._get_convert_map = original


def _converter_class(base, name: str, since: int, convert: Callable):
    """An OnnxOpConverter whose only version, ``since``, calls ``convert``."""
    def impl(cls, bb, inputs, attr, params):
        return convert(bb, inputs, attr)

    return type(f"Effc{name}Converter", (base,), {f"_impl_v{since}": classmethod(impl)})


def _rooted(func):
    """``func`` with its body as one opaque block under a root block, the form Relax's passes over
    kernels expect (SplitLayoutRewritePreproc rejects a PrimFunc without blocks)."""
    from tvm import s_tir

    def realize(name, body):
        return s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], name, body))

    return func.with_body(realize("root", realize("kernel", func.body)))


def _registered_calls(proto) -> set[tuple[str, str]]:
    """(domain, name) of every registered op left in the graph or in any subgraph (If branches)."""
    found = set()

    def walk(graph) -> None:
        for node in graph.node:
            if custom_op(node) is not None:
                found.add((node.domain, node.op_type))
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g)

    walk(proto.graph)
    return found
