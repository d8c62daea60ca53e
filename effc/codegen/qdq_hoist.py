"""QuantizeLinear moved ahead of the Reshape/Transpose in front of it, on the ONNX graph.

ONNX Runtime's quantize_static quantizes attention's heads after their layout change:
``linear -> Reshape -> Transpose -> QuantizeLinear -> DequantizeLinear -> MatMul``. Per tensor,
quantisation is elementwise, so it commutes with any pure data movement; moved ahead of it,

    linear -> QuantizeLinear -> Reshape -> Transpose -> DequantizeLinear -> MatMul

it fuses into the producer's write-back (the projection's int8 kernel writes bytes), and the layout
change moves bytes instead of reading floats: no separate quantising pass over float memory. The
result is the same to the bit.
"""

from __future__ import annotations

MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def hoist_quantize(proto) -> int:
    """Move every per-tensor QuantizeLinear ahead of the data-movement chain feeding it (each link
    used only by the next); returns how many moved. ``proto`` is changed in place."""
    graph = proto.graph
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 2  # a graph output keeps its float form
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
    if moved:  # written back once: extend copies the messages, the ones above are the originals
        del graph.node[:]
        graph.node.extend(order)
        # the chain's tensors are bytes now: drop their float type annotations
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return moved
