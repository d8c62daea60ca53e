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

Columns alike: with n padded to whole panels (197-wide attention scores), the write-back of every
panel carries the column check ``(panel % panels) * nr + lane < n``, and TVM scalarised the masked
write-back (one branch per element; Q.K^T of vit-s16 ran 1.6x its unpadded 208-wide time). The
panel loop is fused with the batch, so the last panel is not the loop's last iteration; the rule
marks the fused loop with FULL_PANELS_KEY (the panel count) and ``full_panel_pass`` writes

    for f in range(B * P): body(f)    into    for f in range(B * P):
                                                  if f % P < P - 1: body(f)   (checks provably true)
                                                  else: body(f)
"""

from __future__ import annotations

PEEL_KEY = "effc.peel_last_tile"
FULL_PANELS_KEY = "effc.full_panels"


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


def full_panel_pass():
    """A TIR module pass: in every loop marked FULL_PANELS_KEY (value: P, the panels per batch),
    run the body of full panels (``f % P < P - 1``) in a branch of its own, where TVM's
    simplifier drops the column checks and the write-back is plain vectors."""
    from tvm import tirx

    def split(node):
        if not isinstance(node, tirx.For) or node.annotations is None or FULL_PANELS_KEY not in node.annotations:
            return node
        panels = int(node.annotations[FULL_PANELS_KEY])
        annotations = {k: v for k, v in node.annotations.items() if k != FULL_PANELS_KEY}
        body = node.body
        if panels >= 2:
            dtype = str(node.loop_var.ty)
            full = tirx.floormod(node.loop_var, tirx.IntImm(dtype, panels)) < tirx.IntImm(dtype, panels - 1)
            body = tirx.IfThenElse(full, body, body)
        return tirx.For(node.loop_var, node.min, node.extent, node.kind, body, node.thread_binding, annotations)

    from effc.codegen.tir_rewrite import marked_stmt_pass

    return marked_stmt_pass("EffcFullPanels", FULL_PANELS_KEY, split)
