"""int4 weight-only matmuls (blocked DequantizeLinear -> MatMul), lowered before TVM imports a model.

The form: ``MatMul(x, DequantizeLinear(W_q, scale, zp, axis=0, block_size=B))`` with W_q a constant
int4/uint4 [K, N], scales (and zero points) [K / B, N], x float (the form ONNX Runtime turns into
MatMulNBits). The MatMul becomes a call of effc's int4 kernel, the weight packed at compile time:
on AVX-512 VNNI effc.kernels.int4_vnni (the activations quantized to s8 per block, nibbles times s8
on vpdpbusd: what ONNX Runtime's MatMulNBits does at accuracy level 4, its default), on other
AVX-512 CPUs effc.kernels.int4_cpu (nibbles unpacked to float in registers: exact). TVM's importer cannot read blocked
DequantizeLinear at all, so every other blocked DQ of constants (a shape the kernel does not tile,
a CPU without AVX-512, a consumer that is no MatMul) is folded here to its float weight, the
reason recorded in the manifest's ``custom_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from effc.codegen.qdq_lowering import FALLBACK, ProtoLowering, _attr, _Graph

PRIVATE_OP = "EffcInt4MatMul"
INDEX_ATTR = "effc_int4_index"
RULE = "int4-unpack"  # exact: nibbles to float (effc.kernels.int4_cpu), AVX-512 without VNNI
VNNI_RULE = "int4-vnni"  # int8 activations per block on vpdpbusd (effc.kernels.int4_vnni), as ORT's default


@dataclass
class Int4Plan:
    node: str
    reason: str = ""
    q: np.ndarray | None = None  # unsigned nibbles [K, N]
    scale: np.ndarray | None = None
    zp: np.ndarray | None = None
    block: int = 0
    kernel: str | None = None


@dataclass
class Int4Lowering(ProtoLowering):
    rule = RULE

    def __post_init__(self):
        from effc.codegen.qdq_lowering import _has_vnni

        # ONNX Runtime's MatMulNBits (accuracy level 4, its default for a fused DQ -> MatMul)
        # quantizes the activations to int8 per block as well; verification holds the module to
        # ONNX Runtime's own rounding (effc.codegen.qdq_tolerance)
        self.vnni = _has_vnni(self.target)
        self.rule = VNNI_RULE if self.vnni else RULE

    def rewrite(self, proto):
        from onnx import helper, numpy_helper

        graph = _Graph(proto)
        consumers: dict[str, list] = {}
        for node in proto.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        avx512 = _has_avx512(self.target)
        dead: set[str] = set()
        for i, node in enumerate(list(proto.graph.node)):  # a copy: nodes may be removed
            if node.op_type != "DequantizeLinear" or not _attr(node, "block_size", 0):
                continue
            values = _dq_values(graph, node)
            inputs = set(node.input)
            users = consumers.get(node.output[0], [])
            if values is None:
                continue  # not constant: TVM's importer will say it cannot read it
            for user in users:
                if user.op_type != "MatMul" or user.input[1] != node.output[0]:
                    continue
                plan = _plan(user.name or f"MatMul_{i}", node, values, avx512)
                self.plans.append(plan)
                if not plan.reason:
                    user.op_type = PRIVATE_OP
                    del user.input[1:]
                    user.attribute.append(helper.make_attribute(INDEX_ATTR, len(self.plans) - 1))
            if users and all(u.op_type == PRIVATE_OP for u in users):
                proto.graph.node.remove(node)  # TVM cannot import a blocked DQ, even a dead one
            else:
                # the float path: the weight dequantized once, here
                dense = numpy_helper.from_array(_dequantize(*values), node.output[0])
                node.op_type = "Constant"
                del node.input[:], node.attribute[:]
                node.attribute.append(helper.make_attribute("value", dense))
            dead.update(inputs)
        _drop_unused(proto, dead)  # int4 initializers left behind would reach the importer as params
        return proto

    def table(self) -> dict:
        return {PRIVATE_OP: (1, self._convert)}

    def _convert(self, bb, inputs, attr):
        from tvm import relax

        from effc.codegen.custom_ops import _rooted
        from effc.kernels import int4_cpu as k4
        from effc.kernels import int4_vnni

        plan = self.plans[attr[INDEX_ATTR]]
        x = inputs[0]
        shape = [int(d) for d in x.ty.shape]
        k, n = plan.q.shape
        m = int(np.prod(shape[:-1]))
        nv = k4.panel_vectors(m)
        kernel = int4_vnni if self.vnni else k4
        packed = kernel.pack(plan.q, plan.scale, plan.zp, plan.block, nv * k4.LANES)
        n_pad = packed.words.shape[0] * nv * k4.LANES
        plan.kernel = f"{'int4_vnni' if self.vnni else 'int4_matmul'}_m{m}_k{k}_n{n_pad}_b{plan.block}_"
        func = _rooted(kernel.prim_func(m, k, n_pad, plan.block, nv)).without_attr("global_symbol").with_attrs(
            {"tirx.is_scheduled": 1, "op_pattern": 8, "effc.rule": self.rule})
        gv = bb.add_func(func, plan.kernel)
        args = [relax.op.reshape(x, [m, k])] + [self._lift(f"{plan.node}.{name}", a) for name, a in
                                                  (("w4", packed.words), ("scales", packed.scales),
                                                   ("zeros", packed.zeros))]
        y = relax.call_tir(gv, args, relax.TensorType([m, n_pad], "float32"))
        if n_pad != n:
            y = relax.op.strided_slice(y, axes=[1], begin=[0], end=[n])
        return relax.op.reshape(y, [*shape[:-1], n])

    def summary(self, what: str = "int4 matmuls") -> str:
        return super().summary(what)


def _drop_unused(proto, names: set[str]) -> None:
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    gone = names - used
    for field in (proto.graph.initializer, proto.graph.input):
        for item in [t for t in field if t.name in gone]:
            field.remove(item)


def _has_avx512(target) -> bool:
    from effc.codegen.target import cpu_has

    return cpu_has(target, "avx512f")


def _dq_values(graph: _Graph, node):
    """(q, scale, zero point or None, axis, block) of a blocked DQ of constants, or None."""
    q = graph.const(node.input[0])
    scale = graph.const(node.input[1])
    zp = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if q is None or scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        return None
    return q, scale, zp, int(_attr(node, "axis", 1)), int(_attr(node, "block_size", 0))


def _dequantize(q, scale, zp, axis, block) -> np.ndarray:
    """DequantizeLinear with blocked scales, in numpy (the reference semantics)."""
    axis %= q.ndim
    expand = lambda a: np.repeat(a.astype(np.float32), block, axis=axis).take(  # noqa: E731
        np.arange(q.shape[axis]), axis=axis)
    zero = expand(zp) if zp is not None else 0.0
    return ((q.astype(np.float32) - zero) * expand(scale)).astype(np.float32)


def _plan(name: str, node, values, avx512: bool) -> Int4Plan:
    from effc.kernels import int4_cpu as k4

    q, scale, zp, axis, block = values
    if not avx512:
        return Int4Plan(name, "the CPU has no AVX-512")
    if q.ndim != 2 or axis % 2 != 0:
        return Int4Plan(name, "the weight is not blocked along K of a 2-D [K, N] weight")
    if str(q.dtype) not in ("int4", "uint4"):
        return Int4Plan(name, f"weight type {q.dtype} (the kernel reads 4-bit weights)")
    k, n = q.shape
    reason = k4.misfit(k, n, block)
    if reason:
        return Int4Plan(name, reason)
    offset = 8 if str(q.dtype) == "int4" else 0  # signed nibbles stored with +8, zero point alike
    qn = (q.astype(np.int32) + offset).astype(np.uint8)
    zn = (zp.astype(np.int32) + offset if zp is not None else np.full(scale.shape, offset)).astype(np.uint8)
    return Int4Plan(name, "", qn, scale.astype(np.float32), zn, block)


__all__ = ["FALLBACK", "Int4Lowering"]
