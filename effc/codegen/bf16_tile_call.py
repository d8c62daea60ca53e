"""Lower the bf16 matmul rule's tiles to calls of effc/kernels/bf16_tile.c.

The rule (schedules/cpu/matmul_bf16.py) blockizes each mr x nr tile's k loop and marks the block
with TILE_KEY = (mr, nr, k padded to pairs, m, n, k, B layout): the tiles at the edges of a matrix
that no tile divides compute only their rows and vectors inside m x n, and an odd k needs no zero
column in A, so A can be read in place, unpadded; B layout 1: B is read in place as a row-major
[k, n] matrix, its panel packed by the C tile (a computed operand: attention's V); 2: B is read as
its rows [n, k] (K's rows for Q.K^T), the panel packed from them (SYMBOL_ROWS); the block still holds the plain loop nest (C[i, j] += f32(A[i, k]) *
f32(B[k / 2, j, k % 2])), so a build without this pass (the kernel checks) computes the same. This
pass, at the front of effc's TIR pipeline, replaces that body by one call. (TVM 0.27's tensorize
crashes in this wheel, and its LLVM codegen has no bfloat vector type for vdpbf16ps: hence a block
annotation and a C tile.) Element sizes and row strides are passed as addresses of the next element
and the next row, so they stay right whatever TVM later does to the buffers (compaction, flattening,
widening a bf16 buffer inside the kernel to fp32).
"""

from __future__ import annotations

PIPELINE = "effc-cpu"
TILE_KEY = "effc.bf16_tile"
SYMBOL = "effc_bf16_tile_part"
SYMBOL_ROWS = "effc_bf16_tile_rows"  # B given as its rows [n, k] (attention's K for Q.K^T)
LANES = 16  # fp32 lanes of a zmm register: nr is a multiple


def bf16_tile_pass():
    from tvm import s_tir, tirx

    def lower(node):
        if not isinstance(node, s_tir.SBlock) or TILE_KEY not in node.annotations:
            return node
        mr, nr, k_pad, *valid = (int(v) for v in node.annotations[TILE_KEY])
        m, n, k, b_layout = valid or (None, None, k_pad, 0)  # the matrix's own sizes: edge tiles are partial
        c = node.writes[0]
        a, b = [r for r in node.reads if str(r.source.dtype) == "bfloat16"]
        rows, cols = tile_edge(c, -2, m, mr), tile_edge(c, -1, n, nr)
        call = tirx.call_extern("int32", SYMBOL_ROWS if b_layout == 2 else SYMBOL, element_address(c),
                                element_address(c, row=1), element_address(a), element_address(a, column=1),
                                element_address(a, row=1), element_address(b), element_address(b, column=1),
                                element_address(b, row=1) if b_layout else element_address(b),
                                tirx.IntImm("int64", k_pad // 2),
                                tirx.IntImm("int32", mr), tirx.IntImm("int32", nr // LANES), _first_row_tile(c),
                                rows, cols,
                                tirx.IntImm("int64", k))
        annotations = {key: value for key, value in node.annotations.items() if key != TILE_KEY}
        return s_tir.SBlock(node.iter_vars, node.reads, node.writes, node.name_hint, tirx.Evaluate(call), None,
                            node.alloc_buffers, node.match_buffers, annotations)

    from effc.codegen.tir_rewrite import marked_stmt_pass

    return marked_stmt_pass("EffcBf16TileCall", TILE_KEY, lower)


def tile_edge(c_region, axis: int, size, whole: int):
    """How many rows or columns of the tile at ``c_region`` lie inside the matrix's ``size`` along
    ``axis``: ``whole`` but at the padded edge (``size`` None: always)."""
    from tvm import tirx

    if size is None:
        return tirx.IntImm("int32", whole)
    start = c_region.region[axis].min
    dtype = str(start.ty)
    return tirx.Cast("int32", tirx.min(tirx.IntImm(dtype, size) - start, tirx.IntImm(dtype, whole)))


def _first_row_tile(c_region):
    """1 for the first row tile of a j-panel (C's row offset 0): there the tile converts a computed
    (fp32-stored) B panel, which the panel's later tiles, run after it on the same thread, reuse."""
    from tvm import tirx

    row = c_region.region[-2].min
    return tirx.Cast("int32", row == tirx.IntImm(str(row.ty), 0))


def element_address(region, row: int = 0, column: int = 0):
    """The address of ``region``'s first element, or of the one ``row`` rows / ``column`` columns on
    (the kernel takes element sizes and strides from such differences)."""
    from tvm import tirx

    index = [r.min for r in region.region]
    index[-2] = index[-2] + row if row else index[-2]
    index[-1] = index[-1] + column if column else index[-1]
    return tirx.address_of(tirx.BufferLoad(region.source, index))


def register_pipeline() -> str:
    """Register effc's CPU TIR pipeline (once): this pass and the int8 tiles' calls
    (effc.codegen.int8_tile_call), then the prefetching s_tir pipeline."""
    import tvm
    from tvm.tirx import compilation_pipeline

    from effc.codegen import prefetch
    from effc.codegen.int8_tile_call import int8_tile_pass

    if PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        def factory(**kwargs):
            base, host, device = compilation_pipeline.PIPELINE_MAP[prefetch.register_pipeline()](**kwargs)
            return tvm.transform.Sequential([bf16_tile_pass(), int8_tile_pass(), base]), host, device

        compilation_pipeline.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE
