"""Lower effc.ShiftAddMatMul for TVM: effc's LUT kernels, else a dense weight at compile time.

Each node whose weight fits the kernels, with float32 X and bias and constant planes/codes,
becomes a call_tir to a hand-written PrimFunc (one per distinct shape) whose packed weight arrays
are new trailing parameters of main, so they ship in params.bin: on an AVX-512 llvm target the CPU
kernels (effc.kernels.shift_add_cpu: decode or prefill by M), on CUDA the shared-memory table
kernel (effc.kernels.shift_add_cuda). Every other node has its ONNX function body inlined: its
planes and codes are constants, so TVM folds them into a dense weight at compile time. The
manifest records which node got which lowering and why.

How the call_tir gets in: TVM 0.27's importer looks converters up by bare op name in
``onnx_frontend._get_convert_map()`` and takes no custom converters, so while importing, that
function is wrapped to add one for a private op that the kernel nodes are renamed to (restored
afterwards, even on error). The converter sees X as the importer's own Relax value with its
static shape, so it can pick the kernel by M and reshape/pad in place; cutting the nodes out and
splicing calls back into the imported dataflow block would mean rebuilding the block by hand.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import const_value
from effc.ops import DOMAIN
from effc.ops.shift_add_matmul import NAME

LUT = "shift-add-lut"  # rule label of the kernels (manifest, profile)
DENSE = "dense"
PRIVATE_OP = "EffcShiftAddLut"  # what kernel nodes are renamed to for the importer
INDEX_ATTR = "effc_index"


@dataclass
class Lowering:
    node: str
    lowering: str  # LUT or DENSE
    reason: str = ""  # why DENSE
    kernel: str | None = None  # the PrimFunc's symbol (LUT)


def is_shift_add(node) -> bool:
    return node.domain == DOMAIN and node.op_type == NAME


def _has_avx512(target) -> bool:
    from tvm.target.codegen import target_has_features

    return bool(target_has_features("avx512f", target))


class ShiftAddLowering:
    """Plans every effc.ShiftAddMatMul of ``model`` for ``target`` (a tvm Target), rewrites the
    ONNX proto accordingly and converts the kernel nodes during import."""

    def __init__(self, model: ir.Model, target):
        self._cuda = target.kind.name == "cuda"
        self.lowerings: list[Lowering] = []
        self._count = len(model.graph)
        self._lut: dict[int, tuple[Lowering, np.ndarray, np.ndarray]] = {}  # top-level node index ->
        self._lifted: list[tuple[object, np.ndarray]] = []  # (relax Var, packed array), in call order
        self._symbols: dict[str, object] = {}
        for i, node in enumerate(model.graph):
            if not is_shift_add(node):
                continue
            low = Lowering(node.name or f"{NAME}_{i}", LUT)
            low.reason = self._misfit(node, low.node, target) or ""
            if low.reason:
                low.lowering = DENSE
            else:
                self._lut[i] = (low, const_value(node.inputs[1]), const_value(node.inputs[2]))
            self.lowerings.append(low)

    @staticmethod
    def _misfit(node: ir.Node, name: str, target) -> str | None:
        """Why ``node`` cannot use the kernels (None: it can); EffcError if it is malformed."""
        from effc.kernels import shift_add_cpu, shift_add_cuda

        if len(node.inputs) != 4 or any(v is None for v in node.inputs):
            raise EffcError(f"{name}: {NAME} needs 4 inputs (X, planes, codes, bias), got {len(node.inputs)}")
        x, planes, codes, bias = node.inputs
        p, c = const_value(planes), const_value(codes)
        if p is not None and c is not None:
            _check_weight(name, x, p, c)
        if target.kind.name not in ("llvm", "cuda"):
            return f"no {target.kind.name} kernel yet: dense weight rebuilt at compile time"
        if target.kind.name == "llvm" and not _has_avx512(target):
            return "the CPU kernels need AVX-512"
        if x.dtype != ir.DataType.FLOAT or bias.dtype != ir.DataType.FLOAT:
            return f"kernels take float32 X and bias (got {x.dtype}, {bias.dtype})"
        if p is None or c is None:
            return "planes/codes are not constants"
        kernels = shift_add_cuda if target.kind.name == "cuda" else shift_add_cpu
        return kernels.misfit(p.shape, c.shape)

    # --- before import: the proto ---------------------------------------------------------

    def rewrite(self, proto):
        """Rename kernel nodes to the private op (inputs X, bias; planes/codes travel in this
        object, packed) and inline the function body of every other ShiftAddMatMul."""
        import onnx
        import onnx.inliner

        nodes = proto.graph.node
        if len(nodes) != self._count:
            raise EffcError("internal: the serialised graph does not match the model's nodes")
        for i in self._lut:
            node = nodes[i]
            node.op_type = PRIVATE_OP
            del node.input[1:3]
            node.attribute.append(onnx.helper.make_attribute(INDEX_ATTR, i))
        if _calls_anywhere(proto):
            proto = onnx.inliner.inline_selected_functions(proto, [(DOMAIN, NAME)], exclude=False)
        return proto

    # --- during import: the converter -----------------------------------------------------

    @contextlib.contextmanager
    def converter(self):
        """Make TVM's importer convert PRIVATE_OP nodes with ``self._convert`` while in the block."""
        from tvm.relax.frontend.onnx import onnx_frontend as frontend

        original = frontend._get_convert_map
        convert = self._convert

        class Converter(frontend.OnnxOpConverter):
            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):
                return convert(bb, inputs, attr)

        def extended():
            table = original()
            table[PRIVATE_OP] = Converter
            return table

        frontend._get_convert_map = extended
        try:
            yield
        finally:
            frontend._get_convert_map = original

    def _convert(self, bb, inputs, attr):
        from tvm import relax

        from effc.kernels import shift_add_cpu, shift_add_cuda

        low, planes, codes = self._lut[attr[INDEX_ATTR]]
        x, bias = inputs[0], inputs[1]
        shape = [int(d) for d in x.ty.shape]  # dtypes: float32, checked by _misfit; K may be unknown there
        k, n = shape[-1], planes.shape[1]
        if k != planes.shape[2] * 8:
            raise EffcError(f"{low.node}: X has K={k}, the weight {planes.shape[2] * 8}")
        m = int(np.prod(shape[:-1]))
        choice = (shift_add_cuda if self._cuda else shift_add_cpu).choose(planes, codes, m)
        low.kernel = choice.symbol
        gv = self._symbols.get(choice.symbol)
        if gv is None:
            # No global_symbol: the build names it after the GlobalVar, and TVM's dead-code removal
            # drops stale copies only of non-exported functions. is_scheduled: the rules skip it;
            # op_pattern 8 (opaque): nothing is fused into it.
            func = _rooted(choice.func).without_attr("global_symbol").with_attrs(
                {"tirx.is_scheduled": 1, "op_pattern": 8, "effc.rule": LUT})
            gv = self._symbols[choice.symbol] = bb.add_func(func, choice.symbol)
        weights = []
        for part, array in (("bits", choice.bits), ("exps", choice.exps)):
            var = relax.Var(f"{low.node}.lut_{part}", relax.TensorType(list(array.shape), str(array.dtype)))
            self._lifted.append((var, array))  # free here; attach() makes it a parameter of main
            weights.append(var)
        rows = bb.emit(relax.op.reshape(x, [m, k])) if len(shape) != 2 else x
        if choice.rows > m:
            rows = bb.emit(relax.op.nn.pad(rows, [0, choice.rows - m, 0, 0]))
        y = bb.emit(relax.call_tir(gv, [rows, *weights, bias], relax.TensorType([choice.rows, n], "float32")))
        if choice.rows > m:
            y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))
        return relax.op.reshape(y, [*shape[:-1], n]) if len(shape) != 2 else y

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
        return [vars(low) for low in self.lowerings]

    def summary(self) -> str:
        if not self.lowerings:
            return ""
        lut = sum(low.lowering == LUT for low in self.lowerings)
        dense = {low.reason for low in self.lowerings if low.lowering == DENSE}
        text = f"{NAME}: {lut} of {len(self.lowerings)} on the LUT kernels"
        return text + (f"; dense fallback ({'; '.join(sorted(dense))})" if dense else "")


def _check_weight(name: str, x: ir.Value, planes: np.ndarray, codes: np.ndarray) -> None:
    """One-line EffcError for planes/codes that do not follow the op's layout (shift_add_matmul)."""
    if planes.dtype != np.uint8 or codes.dtype != np.int8 or planes.ndim != 3 or codes.ndim != 4:
        raise EffcError(f"{name}: {NAME} needs uint8 planes [q, N, K/8] and int8 codes [q, N, K/g, T] "
                        f"(got {planes.dtype}{list(planes.shape)}, {codes.dtype}{list(codes.shape)})")
    k = planes.shape[2] * 8
    if codes.shape[:2] != planes.shape[:2] or k % codes.shape[2]:
        raise EffcError(f"{name}: codes {list(codes.shape)} do not match planes {list(planes.shape)}")
    dims = list(x.shape or [])
    if dims and isinstance(dims[-1], int) and dims[-1] != k:
        raise EffcError(f"{name}: X has K={dims[-1]} but the packed weight has K={k}")


def _rooted(func):
    """``func`` with its body as one opaque block under a root block, the form Relax's passes over
    kernels expect (SplitLayoutRewritePreproc rejects a PrimFunc without blocks)."""
    from tvm import s_tir

    def realize(name, body):
        return s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], name, body))

    return func.with_body(realize("root", realize("kernel", func.body)))


def _calls_anywhere(proto) -> bool:
    """Whether a ShiftAddMatMul is left in the graph or in any subgraph (If branches)."""
    def walk(graph) -> bool:
        for node in graph.node:
            if is_shift_add(node):
                return True
            for a in node.attribute:
                if any(walk(g) for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)):
                    return True
        return False

    return walk(proto.graph)
