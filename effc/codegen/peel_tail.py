"""Peel the last, partial row tile off a matmul's tile loop, so the full tiles run without row checks.

The matmul rule tiles m rows into mr-row register tiles; when mr does not divide m (vit's 197
tokens), every unrolled row of the k loop carries a bound check ``io * mr + ii < m``. Kept inside
the k loop for every tile, those checks cost 15% of a 197 x 384 x 1536 GEMM at mr = 8 (97 against
115 GFLOP/s for m = 192 or 200, one core). TVM's loop_partition primitive crashes in this wheel
(and s_tir.LoopPartition does not split these predicates), so the rule marks its tile loop with
PEEL_KEY and this pass, at the front of effc's TIR pipeline, rewrites

    for io in range(T): body(io)        into        for io in range(T - 1): body(io)
                                                    body(T - 1)

In the loop the checks are provably true (TVM's simplifier drops them); in the peeled tile they
are constants once its rows are unrolled.
"""

from __future__ import annotations

PEEL_KEY = "effc.peel_last_tile"


def peel_tail_pass():
    """A TIR module pass: peel the last iteration of every loop marked PEEL_KEY."""
    import tvm_ffi
    from tvm import tirx

    def peel(node):
        if not isinstance(node, tirx.For) or node.annotations is None or PEEL_KEY not in node.annotations:
            return node
        annotations = {k: v for k, v in node.annotations.items() if k != PEEL_KEY}
        extent = getattr(node.extent, "value", None)
        if extent is None or extent < 2:  # nothing to split off (the mark is dropped all the same)
            return tirx.For(node.loop_var, node.min, node.extent, node.kind, node.body, node.thread_binding,
                            annotations)
        last = node.min + tirx.IntImm(str(node.extent.ty), extent - 1)
        var = node.loop_var
        tail = tvm_ffi.structural_map(node.body, lambda n: last if isinstance(n, tirx.Var) and n.same_as(var) else n)
        head = tirx.For(var, node.min, tirx.IntImm(str(node.extent.ty), extent - 1), node.kind, node.body,
                        node.thread_binding, annotations)
        return tirx.SeqStmt([head, tail])

    from effc.codegen.tir_rewrite import marked_stmt_pass

    return marked_stmt_pass("EffcPeelTailTile", PEEL_KEY, peel)
