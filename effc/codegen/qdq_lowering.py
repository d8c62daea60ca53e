"""QDQ matmuls -> integer matmuls, while TVM imports a model (before import, on the ONNX proto).

TVM's importer reads a QDQ model as fake quantisation: DequantizeLinear -> float MatMul, the weight
folded back to float32 at compile time. This pass finds, on the ONNX graph,

    MatMul(DQ(x_q), DQ(W_q))   x_q an 8-bit activation (per-tensor scale/zero point),
    Gemm(DQ(x_q), DQ(W_q), C)  W_q a constant 8-bit weight (per-tensor or per-output-channel)

and replaces the MatMul/Gemm by a private op whose converter emits

    acc = matmul(x_u8, W_s8, out_dtype=int32)        (effc's int8 rule: vpdpbusd, W pre-packed)
    y   = float(acc + comp[n]) * scale[n] (+ C[n])   comp = -zx * sum_k W[k, n]; scale = sx * sw[n]

so that FuseOps puts everything after it (the bias Add, GELU, the residual Add, the QuantizeLinear
of the output, i.e. requantisation) into the kernel's write-back. An s8 activation is moved to u8
(x + 128, zx + 128) because vpdpbusd multiplies unsigned by signed bytes; a weight zero point is
folded into the weight when W - zw still fits in s8. Whatever does not fit stays on the float path
(DQ folded to float weights) with its reason in the manifest's ``custom_ops``.

Attention's two matmuls multiply two activations, both through per-tensor DQ (``MatMul(DQ(a_q),
DQ(b_q))``, Q.K^T and P.V in an exported ViT/BERT). There B is moved to s8 instead (b - 128, zb -
128: exact, it is the same bytes with the top bit flipped) and the zero points are corrected at run
time with the row sums of A and the column sums of B:

    sum_k (a - za)(b - zb) = acc - zb * rowsum(a) - za * colsum(b) + K za zb,  acc = a_u8 . b_s8

each sum emitted only where the zero point it multiplies is not 0 (P from a softmax has za = 0).

A QDQ Conv is planned and converted by effc.codegen.qdq_conv (W_s8 x a u8 im2col on the same rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from effc.codegen.product_nt import product_nt, rows_transposed

PRIVATE_OP = "EffcQdqMatMul"
INDEX_ATTR = "effc_qdq_index"
RULE = "int8-vnni"
FALLBACK = "float (DQ folded)"


@dataclass
class Plan:
    node: str
    reason: str = ""
    x: str = ""  # the quantized activation (the DQ's input)
    x_signed: bool = False
    weight: np.ndarray | None = None  # int8 [K, N]
    comp: np.ndarray | None = None  # int32 [N]
    scale: np.ndarray | None = None  # float32 [N]
    bias: np.ndarray | None = None  # float32 [N] (Gemm's C)
    y: str = ""  # activation x activation: B's quantized activation (its DQ's input)
    y_signed: bool = False
    zero_points: tuple = (0, 0)  # activation x activation: (za as u8, zb as s8)


@dataclass
class ProtoLowering:
    """What the proto-level lowerings share: constants lifted to parameters of main, the report."""

    target: object
    plans: list = field(default_factory=list)  # each with .node and .reason ("" when taken)
    hoisted: int = 0  # QuantizeLinear moved ahead of data movement (effc.codegen.qdq_hoist)
    dropped: int = 0  # DQ -> Reshape/Transpose/Split -> Q pairs of equal parameters dropped (qdq_hoist)
    unit: int = 0  # Q(DQ(q) * c) / Q(DQ(q) + 0) giving back q, dropped (effc.codegen.qdq_identity)
    _lifted: list = field(default_factory=list)  # (relax Var, array) in call order
    rule = RULE

    def _lift(self, name: str, array: np.ndarray):
        from tvm import relax

        var = relax.Var(name, relax.TensorType(list(array.shape), str(array.dtype)))
        self._lifted.append((var, np.ascontiguousarray(array)))
        return var

    def attach(self, mod, values: list[np.ndarray]):
        """The lifted weights become trailing parameters of main: (module, values)."""
        from tvm import relax

        if not self._lifted:
            return mod, values
        main = mod["main"]
        mod["main"] = relax.Function(list(main.params) + [v for v, _ in self._lifted], main.body, main.ret_ty,
                                     main.is_pure, main.attrs)
        return mod, list(values) + [a for _, a in self._lifted]

    def report(self) -> list[dict]:
        return [{"node": p.node, "lowering": FALLBACK if p.reason else self.rule, "reason": p.reason,
                 "kernel": getattr(p, "kernel", None)} for p in self.plans]

    def summary(self, what: str = "QDQ matmuls") -> str:
        if not self.plans:
            return ""
        taken = sum(not p.reason for p in self.plans)
        reasons = sorted({p.reason for p in self.plans if p.reason})
        text = f"{what}: {taken} of {len(self.plans)} on the {self.rule} kernels"
        return text + (f"; float path ({'; '.join(reasons)})" if reasons else "")


@dataclass
class QdqLowering(ProtoLowering):
    """Plans every MatMul/Gemm/Conv of a proto for ``target`` and converts the taken ones during import."""

    convs: int = 0  # Conv plans among them (effc.codegen.qdq_conv)

    def rewrite(self, proto):
        from onnx import helper

        if not _has_vnni(self.target):
            reason = "the CPU has no AVX-512 VNNI"
            self.plans = [Plan(n.name or f"{n.op_type}_{i}", reason) for i, n in enumerate(proto.graph.node)
                          if n.op_type in ("MatMul", "Gemm", "Conv")
                          and _producer_op(proto, n.input[0]) == "DequantizeLinear"]
            self.convs = sum(n.op_type == "Conv" and _producer_op(proto, n.input[0]) == "DequantizeLinear"
                             for n in proto.graph.node)
            return proto
        from effc.codegen.qdq_conv import plan_conv
        from effc.codegen.qdq_hoist import drop_requantize, drop_split_requantize, hoist_quantize
        from effc.codegen.qdq_identity import drop_unit_requantize

        self.unit = drop_unit_requantize(proto)
        self.dropped = drop_split_requantize(proto) + drop_requantize(proto)
        self.hoisted = hoist_quantize(proto)
        graph = _Graph(proto)
        for i, node in enumerate(list(proto.graph.node)):
            if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or f"{node.op_type}_{i}"
            plan = plan_conv(graph, node, name) if node.op_type == "Conv" else _plan(graph, node, name)
            if plan is None:
                continue
            self.convs += node.op_type == "Conv"
            self.plans.append(plan)
            if plan.reason:
                continue
            node.op_type, node.domain = PRIVATE_OP, ""
            del node.input[:]
            node.input.extend([plan.x, plan.y] if plan.y else [plan.x])
            del node.attribute[:]
            node.attribute.append(helper.make_attribute(INDEX_ATTR, len(self.plans) - 1))
        return proto

    def summary(self, what: str = "") -> str:
        text = super().summary(what or ("QDQ matmuls and convs" if self.convs else "QDQ matmuls"))
        moved = f"; {self.hoisted} QuantizeLinear moved ahead of Reshape/Transpose" if self.hoisted else ""
        if self.dropped:
            moved += f"; {self.dropped} DequantizeLinear/QuantizeLinear pairs around Reshape/Transpose/Split dropped"
        if self.unit:
            moved += f"; {self.unit} QuantizeLinear giving back their input's bytes (scale by 1, add 0) dropped"
        return text + moved if text else text

    def table(self) -> dict:
        return {PRIVATE_OP: (1, self._convert)}

    def _convert(self, bb, inputs, attr):
        from tvm import relax

        from effc.codegen.qdq_conv import ConvPlan, convert_conv

        plan = self.plans[attr[INDEX_ATTR]]
        if isinstance(plan, ConvPlan):  # the gather moves an s8 activation to u8 itself
            return convert_conv(self, bb, inputs[0], plan)
        x = _as_u8(inputs[0]) if plan.x_signed else inputs[0]  # vpdpbusd: the left operand unsigned
        if plan.y:
            return _activation_product(bb, x, inputs[1], plan)
        w = self._lift(f"{plan.node}.weight_s8", plan.weight)
        acc = relax.op.matmul(x, w, out_dtype="int32")
        if np.any(plan.comp):
            acc = relax.op.add(acc, self._lift(f"{plan.node}.zero_point_comp", plan.comp))
        y = relax.op.multiply(relax.op.astype(acc, "float32"), self._lift(f"{plan.node}.scale", plan.scale))
        if plan.bias is not None:
            y = relax.op.add(y, self._lift(f"{plan.node}.bias", plan.bias))
        return y


def _flip(x, dtype: str):
    """x +- 128 as ``dtype`` (u8 <-> s8 with the zero point moved alike: the same real values)."""
    from tvm import relax

    wide = relax.op.astype(x, "int16")
    shifted = relax.op.add(wide, relax.const(128, "int16")) if dtype == "uint8" else \
        relax.op.subtract(wide, relax.const(128, "int16"))
    return relax.op.astype(shifted, dtype)


def _as_u8(x):
    return _flip(x, "uint8")


def _activation_product(bb, a, b, plan: Plan):
    """(a - za)(b - zb) * sa * sb for two quantized activations, a u8 and b (moved to) s8.

    Where B is a transpose that moves its source's last axis to -2 (attention's K^T: the K
    projection's rows turned to [.., 64, tokens]), B^T [.., N, K] is taken instead: one layout change
    of whole rows (as cheap as V's heads) instead of a byte transpose (vit-s16: 0.037 ms a layer,
    more than the Q.K^T rule's own packing), the product reads it along k (4 contiguous bytes per
    vpdpbusd lane when the rule packs it), and B's column sums are sums along its last axis."""
    from tvm import relax

    za, zb = plan.zero_points
    b_t = rows_transposed(bb, b)
    if b_t is not None:
        b_t = bb.emit(b_t if plan.y_signed else _flip(b_t, "int8"))  # one tensor for the product and its sums
        acc = product_nt(bb, a, b_t, "int32")
        b_rows = b_t
    else:
        b = b if plan.y_signed else _flip(b, "int8")
        acc = relax.op.matmul(a, b, out_dtype="int32")
        # summed along the last axis of B^T: TVM's reduction rules handle last-axis sums (over
        # axis -2 the generic schedule ran 10x slower than the whole P.V product)
        rank = len(bb.normalize(b).ty.shape)
        b_rows = relax.op.permute_dims(b, list(range(rank - 2)) + [rank - 1, rank - 2])
    if zb:
        rows = relax.op.sum(relax.op.astype(a, "int32"), axis=[-1], keepdims=True)
        acc = relax.op.subtract(acc, relax.op.multiply(rows, relax.const(zb, "int32")))
    if za:
        cols = relax.op.sum(relax.op.astype(relax.op.expand_dims(b_rows, -3), "int32"), axis=[-1])  # [.., 1, N]
        acc = relax.op.subtract(acc, relax.op.multiply(cols, relax.const(za, "int32")))
        if zb:
            k = int(bb.normalize(a).ty.shape[-1])
            acc = relax.op.add(acc, relax.const(k * za * zb, "int32"))
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(float(plan.scale.reshape(())), "float32"))


def _has_vnni(target) -> bool:
    from effc.codegen.target import cpu_has

    return cpu_has(target, "avx512vnni")


def _producer_op(proto, name: str) -> str | None:
    for n in proto.graph.node:
        if name in n.output:
            return n.op_type
    return None


class _Graph:
    """Producers, consumers and constant values of an ONNX graph proto."""

    def __init__(self, proto):
        from onnx import numpy_helper

        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.consts = {t.name: t for t in proto.graph.initializer}
        self.inputs = {i.name for i in proto.graph.input}
        for n in proto.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = n.attribute[0].t
        self._numpy = numpy_helper.to_array
        self._cache: dict[str, np.ndarray] = {}

    def const(self, name: str) -> np.ndarray | None:
        if not name or name not in self.consts or name in self.inputs - set(self.consts):
            return None
        if name not in self._cache:
            self._cache[name] = self._numpy(self.consts[name])
        return self._cache[name]


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dq(graph: _Graph, name: str):
    """(DQ node, x, scale, zero point) when ``name`` is the output of a per-tensor/per-axis
    DequantizeLinear with constant scale and zero point, else (None, reason)."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None, "an input is not dequantized"
    if _attr(node, "block_size", 0):
        return None, "blocked DequantizeLinear"
    scale = graph.const(node.input[1])
    zp = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        return None, "scale or zero point is not a constant"
    return (node, node.input[0], scale.astype(np.float32), zp), ""


def dq_operands(graph: _Graph, node, name: str):
    """A MatMul/Gemm/Conv's two DequantizeLinear inputs as ``_dq`` reads them, (a, b); None when
    neither input is one (a float op, left alone); a refusing Plan when only one is."""
    a, why_a = _dq(graph, node.input[0])
    b, why_b = _dq(graph, node.input[1])
    if a is None and b is None:
        return None
    if a is None or b is None:
        return Plan(name, why_a or why_b)
    return a, b


def weight_refusal(name: str, sx: np.ndarray, zx: np.ndarray | None, wq: np.ndarray) -> Plan | None:
    """Why an activation times a constant weight stays float (not per-tensor, not 8-bit), or None."""
    if sx.size != 1 or (zx is not None and zx.size != 1):
        return Plan(name, "the activation is not quantized per tensor")
    x_dtype = activation_dtype(zx)
    if x_dtype not in (np.uint8, np.int8) or wq.dtype not in (np.uint8, np.int8):
        return Plan(name, f"not 8-bit ({x_dtype} x {wq.dtype})")
    return None


def activation_dtype(zx: np.ndarray | None) -> np.dtype:
    return zx.dtype if zx is not None else np.dtype(np.uint8)  # no zero point: u8, ONNX's default


def _plan(graph: _Graph, node, name: str) -> Plan | None:
    """The plan for one MatMul/Gemm, or None when it is no QDQ matmul at all (float, untouched)."""
    operands = dq_operands(graph, node, name)
    if not isinstance(operands, tuple):
        return operands
    a, b = operands
    _, x, sx, zx = a
    dq_w, w_name, sw, zw = b
    wq = graph.const(w_name)
    if wq is None:
        return _activation_plan(name, node, a, b)
    refusal = weight_refusal(name, sx, zx, wq)
    if refusal is not None:
        return refusal
    x_dtype = activation_dtype(zx)
    if wq.ndim != 2:
        return Plan(name, f"weight of rank {wq.ndim}")
    bias = None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return Plan(name, "Gemm with transA or alpha")
        trans_b = bool(_attr(node, "transB", 0))
        if len(node.input) > 2 and node.input[2]:
            bias = _bias(graph, node.input[2])
            if bias is None:
                return Plan(name, "Gemm's C is not a constant vector")
            bias = bias * np.float32(_attr(node, "beta", 1.0))
    else:
        trans_b = False
    axis = _attr(dq_w, "axis", 1) % 2 if sw.size > 1 else None
    n = wq.shape[0] if trans_b else wq.shape[1]
    out_axis = (0 if trans_b else 1)
    if axis is not None and axis != out_axis:
        return Plan(name, "the weight is quantized along K, not per output channel")
    w = wq.astype(np.int32)
    zw_n = np.zeros(n, np.int32) if zw is None else np.broadcast_to(zw.astype(np.int32).reshape(-1), (n,))
    w = (w.T if trans_b else w) - zw_n[None, :]
    if w.min() < -128 or w.max() > 127:
        return Plan(name, "the weight minus its zero point does not fit in s8")
    zx_i = int(zx.reshape(())) if zx is not None else 0
    signed = x_dtype == np.int8
    zx_u = zx_i + 128 if signed else zx_i
    comp = (-zx_u * w.sum(axis=0)).astype(np.int32)
    scale = (np.float32(sx.reshape(())) * np.broadcast_to(sw.reshape(-1), (n,))).astype(np.float32)
    if bias is not None and bias.size not in (1, n):
        return Plan(name, "Gemm's C is not a vector over N")
    if bias is not None:
        bias = np.broadcast_to(bias.reshape(-1), (n,)).astype(np.float32)
    return Plan(name, "", x, signed, np.ascontiguousarray(w.astype(np.int8)), comp, scale, bias)


def _bias(graph: _Graph, name: str) -> np.ndarray | None:
    """A constant bias, float or DQ(int32)."""
    value = graph.const(name)
    if value is not None:
        return value.astype(np.float32).reshape(-1)
    dq, _ = _dq(graph, name)
    if dq is None:
        return None
    _, q, scale, zp = dq
    q = graph.const(q)
    if q is None:
        return None
    zp = 0 if zp is None else zp.astype(np.float32)
    return ((q.astype(np.float32) - zp) * scale).reshape(-1)


def _activation_plan(name: str, node, a, b) -> Plan:
    """The plan for MatMul(DQ(a_q), DQ(b_q)) with both operands activations quantized per tensor."""
    if node.op_type != "MatMul":
        return Plan(name, "Gemm of two activations")
    (_, x, sx, zx), (_, y, sy, zy) = a, b
    if sx.size != 1 or sy.size != 1 or any(z is not None and z.size != 1 for z in (zx, zy)):
        return Plan(name, "an activation is not quantized per tensor")
    dtypes = [np.dtype(np.uint8) if z is None else z.dtype for z in (zx, zy)]
    if any(d not in (np.uint8, np.int8) for d in dtypes):
        return Plan(name, f"not 8-bit ({dtypes[0]} x {dtypes[1]})")
    x_signed, y_signed = (d == np.int8 for d in dtypes)
    za = (0 if zx is None else int(zx.reshape(()))) + (128 if x_signed else 0)
    zb = (0 if zy is None else int(zy.reshape(()))) - (0 if y_signed else 128)
    scale = np.float32(sx.reshape(())) * np.float32(sy.reshape(()))
    return Plan(name, "", x, x_signed, scale=np.asarray(scale, np.float32), y=y, y_signed=y_signed,
                zero_points=(za, zb))
