"""Stream a matmul's next weight panel into cache while the current panel is computed.

In a model, each weight is read from DRAM once per inference (gpt2 streams ~500 MB; this VM reads
~14 GB/s per core). The matmul rule walks B panel by panel ([n / nr, k, nr], effc/codegen/schedules/
cpu/matmul.py), and all row tiles of a panel reuse it from L2, so DRAM is needed only while the first
tile runs: that tile stalls, and the others leave the memory bus idle. Measured at 2 threads on
128x768x3072: 2.36 ms with the weight cold, 2.01 ms warm.

This pass spreads the next panel's cache lines over every tile: the k loop marked by the rule
(``PREFETCH_KEY``) is split into chunks of CHUNK_K steps, and a short burst of ``llvm.prefetch``
goes before each chunk. Same kernel: 1.95 ms cold, 1.92 ms warm. The prefetches sit between
chunks, not in every k step, because the accumulator tile lives in a workspace buffer that LLVM
cannot prove distinct from the prefetched address: around each prefetch the tile is stored and
reloaded (every 8 k steps that cost 17%; every 64, ~1%).

Only panels that are function parameters of at least MIN_PANEL_BYTES take part: weights packed at
compile time. A computed B (attention's K^T and V) is small and already in cache.
"""

from __future__ import annotations

import math

PIPELINE = "effc_cpu"  # tvm.compile(..., tir_pipeline=PIPELINE) on llvm targets
CHUNK_K = 64  # k steps between prefetch bursts
MIN_PANEL_BYTES = 1 << 20
LOCALITY = 3  # llvm.prefetch locality: 3 = keep in all cache levels (measured best of 1..3)
LINE_FLOATS = 16  # 64-byte cache lines of float32


def prefetch_pass():
    """A TIR module pass: prefetch bursts in every matmul k loop the rule marked."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="EffcPrefetchPanels")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc):
                body = _inject(func)
                if body is not None:
                    mod[gv] = func.with_body(body)
        return mod

    return _pass


def register_pipeline() -> str:
    """Register the s_tir pipeline with the prefetch pass in front (once); return its name."""
    import tvm
    from tvm.tirx import compilation_pipeline

    if PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        def factory(**kwargs):
            base, host, device = compilation_pipeline.PIPELINE_MAP["s_tir"](**kwargs)
            from effc.codegen.peel_tail import full_panel_pass, peel_tail_pass
            from effc.codegen.reciprocal_divide import reciprocal_divide_pass
            from effc.codegen.requant_casts import requant_casts_pass
            from effc.codegen.vnni_pass import vnni_pass

            # peeling after prefetching: the peeled tile keeps its prefetches
            return tvm.transform.Sequential([prefetch_pass(), peel_tail_pass(), full_panel_pass(), vnni_pass(),
                                             requant_casts_pass(), reciprocal_divide_pass(), base]), host, device

        compilation_pipeline.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE


def _inject(func):
    """The function body with prefetches, or None when it has no marked loop over a weight panel."""
    import tvm_ffi
    from tvm import tirx

    from effc.codegen.schedules.cpu.matmul import PREFETCH_KEY

    changed = []

    def on_parallel(node):
        if not isinstance(node, tirx.For) or node.kind != tirx.ForKind.PARALLEL:
            return node
        panel_var = node.loop_var

        def on_tile(tile):
            if not isinstance(tile, tirx.For):
                return tile
            stmts = list(tile.body.seq) if isinstance(tile.body, tirx.SeqStmt) else [tile.body]
            found = False
            for i, stmt in enumerate(stmts):
                nr = _marked_nr(stmt, PREFETCH_KEY)
                panel = _weight_panel(func, stmt, nr) if nr else None
                if panel is not None:
                    stmts[i] = _chunked_with_prefetch(stmt, panel, nr, panel_var, tile)
                    found = True
            if not found:
                return tile
            changed.append(tile)
            body = tirx.SeqStmt(stmts) if len(stmts) > 1 else stmts[0]
            return tirx.For(tile.loop_var, tile.min, tile.extent, tile.kind, body, tile.thread_binding,
                            tile.annotations)

        body = tvm_ffi.structural_map(node.body, on_tile)
        return tirx.For(node.loop_var, node.min, node.extent, node.kind, body, node.thread_binding,
                        node.annotations)

    body = tvm_ffi.structural_map(func.body, on_parallel)
    return body if changed else None


def _marked_nr(stmt, key) -> int | None:
    from tvm import tirx

    if isinstance(stmt, tirx.For) and stmt.annotations is not None and key in stmt.annotations:
        return int(stmt.annotations[key])
    return None


def _weight_panel(func, k_loop, nr: int):
    """The parameter holding the packed weight [..., k, nr] that ``k_loop`` walks, if large enough."""
    k = _const(k_loop.extent)
    for buf in func.params:  # TVM 0.27: a PrimFunc param is its buffer
        shape = [_const(d) for d in buf.shape]
        if len(shape) < 3 or None in shape or shape[-1] != nr or shape[-2] != k:
            continue
        if math.prod(shape) * 4 >= MIN_PANEL_BYTES and str(buf.dtype) == "float32":
            return buf
    return None


def _chunked_with_prefetch(k_loop, panel, nr: int, panel_var, tile):
    """for ko: prefetch a burst of the next panel's lines; for ki in CHUNK_K: body(k = ko*CHUNK_K + ki)."""
    import tvm_ffi
    from tvm import tirx

    k_extent, tiles = _const(k_loop.extent), _const(tile.extent)
    step = _chunk(k_extent)
    if step is None or tiles is None:
        return k_loop
    dtype = str(k_loop.extent.ty)

    def c(v):
        return tirx.IntImm(dtype, v)

    chunks = k_extent // step
    panel_floats = k_extent * nr
    burst = -(-(panel_floats // LINE_FLOATS) // (tiles * chunks))  # lines per chunk: the panel over all tiles
    ko, ki, line = tirx.Var("ko", dtype), tirx.Var("ki", dtype), tirx.Var("line", dtype)
    k = k_loop.loop_var
    body = tvm_ffi.structural_map(
        k_loop.body, lambda n: ko * c(step) + ki if isinstance(n, tirx.Var) and n.same_as(k) else n)
    line_index = (tile.loop_var * c(chunks) + ko) * c(burst) + line
    offset = (panel_var + c(1)) * c(panel_floats) + line_index * c(LINE_FLOATS)
    address = tirx.address_of(tirx.BufferLoad(panel, _unravel(offset, panel.shape, c)))
    fetch = tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.IntImm("int32", 0),
                                                tirx.IntImm("int32", LOCALITY), tirx.IntImm("int32", 1)))
    fetches = tirx.For(line, c(0), c(burst), tirx.ForKind.SERIAL, fetch)
    inner = tirx.For(ki, c(0), c(step), tirx.ForKind.SERIAL, body)
    return tirx.For(ko, c(0), c(chunks), tirx.ForKind.SERIAL, tirx.SeqStmt([fetches, inner]))


def _unravel(offset, shape, c) -> list:
    """Indices of flat ``offset`` in a buffer of ``shape``; the first is clamped, so the last
    panel prefetches itself again instead of reading past the buffer."""
    from tvm import tirx

    dims = [_const(d) for d in shape]
    strides = [1] * len(dims)
    for i in range(len(dims) - 2, -1, -1):
        strides[i] = strides[i + 1] * dims[i + 1]
    first = tirx.min(tirx.floordiv(offset, c(strides[0])), c(dims[0] - 1))
    return [first] + [tirx.floormod(tirx.floordiv(offset, c(strides[i])), c(dims[i])) for i in range(1, len(dims))]


def _chunk(k_extent: int) -> int | None:
    """CHUNK_K, or the largest divisor of k between 16 and CHUNK_K; None for a short or prime k."""
    for step in range(CHUNK_K, 15, -1):
        if k_extent % step == 0 and k_extent // step >= 2:
            return step
    return None


def _const(expr) -> int | None:
    value = getattr(expr, "value", None)
    return int(value) if value is not None else None
