"""Requantisations that give back the bytes they were given, dropped on the ONNX graph.

Between attention's Q.K^T and its softmax, a copy quantized with every op (ORT's quantize_static,
``op_types_to_quantize`` all) requantises after each float op:

    q -> DQ(s1, z) -> Mul(c) -> Q(s2, z) -> DQ(s2, z) -> Add(mask) -> Q(s2, z) -> DQ(s2, z) -> Softmax

Calibration gives the scaled tensor the scale s2 = s1 * c (c = 1/sqrt(head_dim), a power of 2 for
head dims 64 and 256, where the product is exact), and ViT's mask is a constant 0. Then each Q gives
back its input's bytes: for every byte q, (q - z) * s1 * c / s2 is (q - z) times 1 + r, |r| a few
float roundings (<= 1e-4 is required), so within 255 * 1e-4 of the whole number q - z, and the
rounding returns it, unclipped. The Q becomes an Identity of q (the readers of its output keep their
own DQ(s2, z)), exactly as ONNX Runtime's graph computes it, and the matmul's write-back quantizes
once instead of three times (each a division, a rounding and a clamp per score: with head_dim 64 that
cost more than the 16 ``vpdpbusd`` a vector of scores takes).

Matched (both operands' per-tensor constant parameters, the same 8-bit zero point and its type):
``Q(DQ(q) * c)`` and ``Q(DQ(q) / c)`` with c a positive constant scalar (or a DQ of one), and
``Q(DQ(q) + 0)`` with the other operand a constant that is 0 everywhere after its own Q/DQ and that
broadcasts no wider than q. The float op must have no other reader.
"""

from __future__ import annotations

import numpy as np

UNIT = 1e-4  # |s1 * c / s2 - 1| at most: 255 * 1e-4 + float rounding stays far from half a step
BYTES = (np.dtype(np.uint8), np.dtype(np.int8))  # zero point types: |q - z| <= 255 (wider ones would need a tighter UNIT)
MAX_CONST = 1 << 22  # elements of a constant operand worth evaluating


def drop_unit_requantize(proto) -> int:
    """Every matched Q (see the module doc) becomes an Identity of the bytes its DQ read; returns how
    many. ``proto`` is changed in place; nodes left without readers are removed."""
    from effc.codegen.qdq_hoist import value_uses, write_back

    graph = proto.graph
    consts = _Constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    uses = value_uses(graph)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.input) if v.type.tensor_type.HasField("shape")}
    dropped = 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.input) < 3:
            continue
        op = producer.get(q.input[0])
        if op is None or op.op_type not in ("Mul", "Div", "Add") or uses.get(op.output[0]) != 1:
            continue
        matched = _bytes_given_back(op, q, producer, consts, shapes)
        if matched is None:
            continue
        q.op_type, q.domain = "Identity", ""
        del q.input[:]
        q.input.append(matched)
        del q.attribute[:]
        dropped += 1
    if dropped:
        write_back(graph, _live(graph), set())
    return dropped


def _bytes_given_back(op, q, producer, consts, shapes) -> str | None:
    """The name of the bytes ``q`` gives back unchanged (its op's DQ input), or None."""
    s2, z2 = consts.scalar(q.input[1]), consts.scalar(q.input[2])
    if s2 is None or z2 is None or not np.isfinite(s2) or float(s2) == 0.0 or z2.dtype not in BYTES:
        return None
    sides = [0, 1] if op.op_type != "Div" else [0]  # Div: only DQ(q) / c
    for side in sides:
        dq = producer.get(op.input[side])
        other = op.input[1 - side]
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) < 3:
            continue
        s1, z1 = consts.scalar(dq.input[1]), consts.scalar(dq.input[2])
        if s1 is None or z1 is None or z1.dtype != z2.dtype or int(z1) != int(z2):
            continue
        if op.op_type == "Add":
            zero = consts.value(other)
            if zero is None or np.any(zero != 0) or s1 != s2 or \
                    not _no_wider(zero.shape, _shape(op.input[side], producer, shapes)):
                continue
            return dq.input[0]
        c = consts.value(other)
        if c is None or c.size != 1 or not float(c.reshape(())) > 0:
            continue
        c = np.float64(c.reshape(()))
        ratio = np.float64(s1) * (c if op.op_type == "Mul" else 1 / c) / np.float64(s2)
        if abs(ratio - 1) <= UNIT:
            return dq.input[0]
    return None


def _shape(name: str, producer, shapes) -> list | None:
    """The annotated shape of ``name`` or, through elementwise Q/DQ/Identity, of what it was made from."""
    for _ in range(8):
        if name in shapes:
            return shapes[name]
        node = producer.get(name)
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Identity"):
            return None
        name = node.input[0]
    return None


def _no_wider(const_shape: tuple, shape: list | None) -> bool:
    """Whether adding a tensor of ``const_shape`` to one of ``shape`` keeps ``shape``."""
    if all(d == 1 for d in const_shape) and (shape is None or len(const_shape) <= len(shape)):
        return shape is not None or not const_shape  # a scalar broadcasts to anything
    if shape is None or len(const_shape) > len(shape) or any(d is None for d in shape):
        return False
    return all(c in (1, s) for c, s in zip(reversed(const_shape), reversed(shape)))


def _live(graph) -> list:
    """The graph's nodes less those none of whose outputs is read (repeatedly)."""
    nodes = list(graph.node)
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


class _Constants:
    """Values of tensors computed from initializers alone (each node run by ONNX's reference
    evaluator, up to MAX_CONST elements)."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.producer = {o: n for n in graph.node for o in n.output}
        self.init = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self._to_array = numpy_helper.to_array
        self._cache: dict[str, np.ndarray | None] = {}

    def scalar(self, name: str):
        value = self.value(name) if name else None
        return value.reshape(()) if value is not None and value.size == 1 else None

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self._cache:
            return self._cache[name]
        value = None
        if name in self.init and name not in self.inputs:
            t = self.init[name]
            if np.prod(t.dims, dtype=np.int64) <= MAX_CONST:
                value = self._to_array(t)
        elif name in self.producer and depth < 8:
            value = self._run(self.producer[name], name, depth)
        self._cache[name] = value
        return value

    def _run(self, node, name: str, depth: int):
        if node.domain not in ("", "ai.onnx") or node.op_type in ("RandomNormal", "RandomUniform", "Multinomial",
                                                                     "RandomNormalLike", "RandomUniformLike"):
            return None
        args = [self.value(i, depth + 1) if i else None for i in node.input]
        if any(a is None for a, i in zip(args, node.input) if i):
            return None
        if node.op_type == "Constant":
            from onnx import helper

            attr = node.attribute[0]
            return self._to_array(attr.t) if attr.name == "value" else np.asarray(helper.get_attribute_value(attr))
        from onnx.reference import ReferenceEvaluator

        try:
            feeds = {i: a for i, a in zip(node.input, args) if i}
            out = ReferenceEvaluator(node).run(None, feeds)
        except Exception:  # an op the reference cannot run: not a known constant
            return None
        value = np.asarray(out[list(node.output).index(name)])
        return value if value.size <= MAX_CONST else None
