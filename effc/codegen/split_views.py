"""Each piece of a split read in place by its consumers: ``split(x)[i]`` becomes a strided slice of x.

A split is a kernel of its own: FuseOps does not fuse an op that returns a tuple with the injective
ops that read its pieces. A transformer's fused QKV projection (GPT-2's c_attn) is split into Q, K
and V and each piece goes straight into its heads' reshape and transpose, so the split was a full
copy of the projection's output ahead of three copies into the head layout. As strided slices
(injective) the pieces fuse into those layout kernels, which then read the projection's output
where it lies; the split is dead code and goes. The same values, to the bit.
"""

from __future__ import annotations

from effc.codegen.relax_rewrite import mutator_pass
from effc.codegen.sink_reshape import static_shape


def split_views_pass():
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class SplitViews(PyExprMutator):
        def visit_tuple_getitem_(self, op):
            op = super().visit_tuple_getitem_(op)
            source = op.tuple_value
            bound = self.lookup_binding(source) if isinstance(source, relax.Var) else None
            if not isinstance(bound, relax.Call) or getattr(bound.op, "name", None) != "relax.split":
                return op
            shape = static_shape(bound.args[0])
            bounds = _piece_bounds(shape, bound.attrs) if shape is not None else None
            if bounds is None or not 0 <= op.index < len(bounds):
                return op
            axis = int(bound.attrs.axis) % len(shape)
            begin, end = bounds[op.index]
            return relax.op.strided_slice(bound.args[0], [axis], [begin], [end], assume_inbound=True)

    return mutator_pass(SplitViews, "EffcSplitViews")


def _piece_bounds(shape: list[int], attrs) -> list[tuple[int, int]] | None:
    """[(begin, end)] of each piece of a split of a ``shape`` tensor along ``attrs.axis``, or None
    where the pieces are not static: ``indices_or_sections`` is a section count (equal pieces, as
    Relax's split makes them: ceil-sized, the last one shorter) or the split points."""
    from tvm import tirx

    size = shape[int(attrs.axis) % len(shape)]
    how = attrs.indices_or_sections
    if isinstance(how, (int, tirx.IntImm)):
        sections = int(how)
        if sections <= 0:
            return None
        step = -(-size // sections)
        points = [min(step * i, size) for i in range(1, sections)]
    else:
        if not all(isinstance(p, (int, tirx.IntImm)) for p in how):
            return None
        points = [min(max(int(p), 0), size) for p in how]
    edges = [0, *points, size]
    return [(a, max(a, b)) for a, b in zip(edges, edges[1:])]
