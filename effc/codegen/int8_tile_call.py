"""Lower the int8 matmul rule's AMX tiles to calls of effc/kernels/int8_tile.c.

On a target with AMX-INT8 the rule (schedules/cpu/int8_matmul.py) blockizes each mr x nr tile's k
loop and marks the block with TILE_KEY = (mr, nr, k padded to quads, m, n, k): the tiles at the
edges of a matrix that no tile divides compute only their rows and columns inside m x n, and read
just k columns of A, so A is read in place, unpadded. The block still
holds the plain loop nest (C[i, j] += int32(A[i, k]) * int32(B[k / 4, j, k % 4])), so a build
without this pass (the kernel checks) computes the same. This pass, at the front of effc's CPU TIR
pipeline (effc.codegen.bf16_tile_call.register_pipeline), replaces that body by one call. Row
strides are passed as addresses of the next row (and of B's next k quad), so they stay right
whatever TVM later does to the buffers (compaction, flattening).
"""

from __future__ import annotations

from effc.codegen.bf16_tile_call import element_address, tile_edge

TILE_KEY = "effc.int8_tile"
SYMBOL = "effc_int8_tile"
INT8 = ("uint8", "int8")


def int8_tile_pass():
    from tvm import s_tir, tirx

    def lower(node):
        if not isinstance(node, s_tir.SBlock) or TILE_KEY not in node.annotations:
            return node
        mr, nr, _, m, n, k = (int(v) for v in node.annotations[TILE_KEY])
        c = node.writes[0]
        a, b = [r for r in node.reads if str(r.source.dtype) in INT8]  # A, then B (the body's order)
        call = tirx.call_extern("int32", SYMBOL, element_address(c), element_address(c, row=1), element_address(a),
                                element_address(a, row=1), element_address(b), _next_quad(b),
                                tirx.IntImm("int64", k), tirx.IntImm("int32", mr), tirx.IntImm("int32", nr),
                                tile_edge(c, -2, m, mr), tile_edge(c, -1, n, nr),
                                tirx.IntImm("int32", int(str(a.source.dtype) == "int8")))
        annotations = {key: value for key, value in node.annotations.items() if key != TILE_KEY}
        return s_tir.SBlock(node.iter_vars, node.reads, node.writes, node.name_hint, tirx.Evaluate(call), None,
                            node.alloc_buffers, node.match_buffers, annotations)

    from effc.codegen.tir_rewrite import marked_stmt_pass

    return marked_stmt_pass("EffcInt8TileCall", TILE_KEY, lower)


def _next_quad(region):
    """The address of B's packed panel [.., k / 4, nr, 4] one k quad on (the kernel's quad stride)."""
    from tvm import tirx

    index = [r.min for r in region.region]
    index[-3] = index[-3] + 1
    return tirx.address_of(tirx.BufferLoad(region.source, index))
