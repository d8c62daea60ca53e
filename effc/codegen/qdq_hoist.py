"""QuantizeLinear moved ahead of the Reshape/Transpose in front of it, on the ONNX graph.

ONNX Runtime's quantize_static quantizes attention's heads after their layout change:
``linear -> Reshape -> Transpose -> QuantizeLinear -> DequantizeLinear -> MatMul``. Per tensor,
quantisation is elementwise, so it commutes with any pure data movement; moved ahead of it,

    linear -> QuantizeLinear -> Reshape -> Transpose -> DequantizeLinear -> MatMul

it fuses into the producer's write-back (the projection's int8 kernel writes bytes), and the layout
change moves bytes instead of reading floats: no separate quantising pass over float memory. The
result is the same to the bit.

A copy quantized with every op (``op_types_to_quantize`` all) also wraps each Reshape/Transpose in
its own pair, ``DQ(s, z) -> Reshape -> Q(s, z)``, with the same scale and zero point on both sides
(ORT makes those ops pass their input's parameters through). Then Q(DQ(q)) = q exactly: (q - z) * s
divided by s is within 1e-4 of the integer q - z (|q - z| <= 255), so the rounding gives it back,
and no clipping happens. ``drop_requantize`` lets such a chain move the bytes q themselves, as ONNX
Runtime's own optimiser does (its DQ -> Reshape -> Q removal); the pairs were float passes over
memory in their kernels, a DQ -> Q per head layout change. ``drop_split_requantize`` does the same
for a Split (GPT-2's fused QKV projection split into Q, K and V): ``DQ -> Split -> Q`` on every
piece, all with DQ's parameters, splits the bytes instead.
"""

from __future__ import annotations

MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def drop_requantize(proto) -> int:
    """Let every ``DQ(s, z) -> moves -> Q(s, z)`` chain (each link used only by the next, the same
    constant per-tensor s and z, s finite and nonzero) carry DQ's input bytes instead; returns how many
    Q were dropped. The DQ stays where it has other readers. ``proto`` is changed in place."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    uses = value_uses(graph)
    consts = {t.name: t for t in graph.initializer if not t.dims}

    def value(name):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    dropped, gone, stale = 0, set(), set()
    for q in nodes:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.input) < 3:
            continue
        chain, source = [], q.input[0]
        while source in producer and producer[source].op_type in MOVES and uses.get(source) == 1:
            chain.append(producer[source])
            source = chain[-1].input[0]
        dq = producer.get(source)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.domain not in ("", "ai.onnx"):
            continue
        params = [(value(a), value(b)) for a, b in zip(dq.input[1:3], q.input[1:3])]
        if any(a is None or b is None or a.dtype != b.dtype or a != b for a, b in params):
            continue
        scale = float(params[0][0])
        if not np.isfinite(scale) or scale == 0.0:
            continue
        if chain:  # the chain reads the bytes; its last link writes Q's output name
            stale |= {n.output[0] for n in chain}  # float annotations of tensors that are bytes now
            chain[-1].input[0] = dq.input[0]
            chain[0].output[0] = q.output[0]
            gone.add(id(q))
        else:  # DQ -> Q directly: Q becomes an Identity of DQ's input (no renaming of its readers,
            # a subgraph's among them)
            q.op_type, q.domain = "Identity", ""
            del q.input[1:]
            q.input[0] = dq.input[0]
            del q.attribute[:]
        uses[source] = uses.get(source, 0) - 1
        if uses[source] == 0:
            gone.add(id(dq))
        dropped += 1
    if dropped:
        write_back(graph, [n for n in nodes if id(n) not in gone], stale)
    return dropped


def drop_split_requantize(proto) -> int:
    """Let every ``DQ(s, z) -> Split -> Q(s, z)`` (the DQ read by the Split only, each piece by one Q
    only, the same constant per-tensor s and z, s finite and nonzero) split DQ's input bytes; returns
    how many Q were dropped. ``proto`` is changed in place."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    uses = value_uses(graph)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims}

    def same(a: str, b: str) -> bool:
        x, y = consts.get(a), consts.get(b)
        return x is not None and y is not None and x.dtype == y.dtype and x == y

    dropped, gone, stale = 0, set(), set()
    for split in nodes:
        if split.op_type != "Split" or split.domain not in ("", "ai.onnx"):
            continue
        dq = producer.get(split.input[0])
        if (dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx")
                or len(dq.input) < 3 or uses.get(split.input[0]) != 1):
            continue
        qs = [readers.get(o, []) for o in split.output]
        if not all(len(r) == 1 and uses.get(o) == 1 for r, o in zip(qs, split.output)):
            continue
        qs = [r[0] for r in qs]
        if not all(q.op_type == "QuantizeLinear" and q.domain in ("", "ai.onnx") and len(q.input) >= 3
                   and q.input[0] == o and same(dq.input[1], q.input[1]) and same(dq.input[2], q.input[2])
                   for q, o in zip(qs, split.output)):
            continue
        scale = float(consts[dq.input[1]])
        if not np.isfinite(scale) or scale == 0.0:
            continue
        stale |= set(split.output) | {split.input[0]}
        split.input[0] = dq.input[0]
        for i, q in enumerate(qs):
            split.output[i] = q.output[0]
            gone.add(id(q))
        gone.add(id(dq))
        dropped += len(qs)
    if dropped:
        write_back(graph, [n for n in nodes if id(n) not in gone], stale)
    return dropped


def write_back(graph, nodes: list, stale: set[str]) -> None:
    """Replace ``graph``'s nodes by ``nodes`` (extend copies the messages: the ones given are the
    originals) and drop the type annotations of ``stale`` tensors (bytes now, or gone)."""
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def value_uses(graph) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 2  # a graph output keeps its float form
    return uses


def hoist_quantize(proto) -> int:
    """Move every per-tensor QuantizeLinear ahead of the data-movement chain feeding it (each link
    used only by the next); returns how many moved. ``proto`` is changed in place."""
    graph = proto.graph
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    uses = value_uses(graph)
    scalars = {t.name for t in graph.initializer if not t.dims}
    moved, order, stale = 0, list(nodes), set()
    for q in nodes:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        if any(name not in scalars for name in q.input[1:] if name):
            continue  # per axis (or computed) parameters: not elementwise along a moved axis
        chain, source = [], q.input[0]
        while source in producer and producer[source].op_type in MOVES and uses.get(source) == 1:
            chain.append(producer[source])
            source = chain[-1].input[0]
        if not chain:
            continue
        first = chain[-1]  # the chain's first node in data order
        early = f"{q.output[0]}_effc_early"
        old_out, last = q.output[0], chain[0]
        moved_tensors = {n.output[0] for n in chain}
        q.input[0], q.output[0] = source, early
        first.input[0] = early
        last.output[0] = old_out
        order.remove(q)
        order.insert(order.index(first), q)
        stale |= moved_tensors | {old_out}
        moved += 1
    if moved:  # written back once, after every move: the chain's tensors are bytes now
        write_back(graph, order, stale)
    return moved
