"""Op-level differences between two models: op counts, nodes and initializers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.ir import op_counts
from effc.stats import param_stats


@dataclass
class ModelDiff:
    ops: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (count in a, count in b), changed only
    params: tuple[int, int] = (0, 0)
    initializers_added: list[str] = field(default_factory=list)
    initializers_removed: list[str] = field(default_factory=list)
    initializers_changed: list[str] = field(default_factory=list)
    nodes: tuple[int, int] = (0, 0)

    @property
    def identical(self) -> bool:
        return not (self.ops or self.initializers_added or self.initializers_removed or self.initializers_changed)


def diff_models(a: ir.Model, b: ir.Model) -> ModelDiff:
    ca, cb = op_counts(a), op_counts(b)
    ops = {op: (ca.get(op, 0), cb.get(op, 0)) for op in sorted(set(ca) | set(cb)) if ca.get(op, 0) != cb.get(op, 0)}
    ia, ib = a.graph.initializers, b.graph.initializers
    changed = []
    for name in sorted(set(ia) & set(ib)):
        ta, tb = ia[name].const_value, ib[name].const_value
        if ta is None or tb is None:
            continue
        xa, xb = ta.numpy(), tb.numpy()
        if xa.shape != xb.shape or xa.dtype != xb.dtype or not np.array_equal(xa, xb):
            changed.append(name)
    return ModelDiff(ops=ops, params=(param_stats(a)[0], param_stats(b)[0]),
                     initializers_added=sorted(set(ib) - set(ia)), initializers_removed=sorted(set(ia) - set(ib)),
                     initializers_changed=changed, nodes=(len(list(a.graph)), len(list(b.graph))))


def render_diff(d: ModelDiff, show_all: bool = False) -> str:
    """The differences as text; lists longer than 8 are cut unless ``show_all``."""
    if d.identical:
        return f"identical graphs ({d.nodes[0]} nodes, {d.params[0]:,} parameters)"
    lines = [f"nodes: {d.nodes[0]} -> {d.nodes[1]}    parameters: {d.params[0]:,} -> {d.params[1]:,}"]
    for op, (x, y) in d.ops.items():
        lines.append(f"  {op:28s} {x:5d} -> {y:5d}  ({y - x:+d})")
    for label, names in (("added", d.initializers_added), ("removed", d.initializers_removed),
                         ("changed", d.initializers_changed)):
        if names:
            cut = not show_all and len(names) > 8
            shown = ", ".join(names if not cut else names[:8]) + (f", ... (+{len(names) - 8}; --all lists them)"
                                                                 if cut else "")
            lines.append(f"  initializers {label} ({len(names)}): {shown}")
    return "\n".join(lines)
