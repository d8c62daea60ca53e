"""Keep bool loads scalar in CUDA kernels: TVM 0.27's CUDA code generator emits a vector of bools
with the wrong element width (two bools, one byte each, are read as a ``ushort2`` from the ``bool*``,
four bytes), so an attention-mask ``where`` fused into a matmul's vectorised write-back reads the
wrong mask bytes (seen on an H100: GPT-style scores off by up to 97%). A vectorised loop that loads a
bool buffer is made serial; every other loop keeps its vectors.
"""

from __future__ import annotations


def _loads_bool(stmt) -> bool:
    import tvm_ffi

    found = []

    def visit(node):
        # TVM 0.27 prints a buffer load as BufferLoad but builds a tvm.ir.TensorLoad (its buffer in
        # .source); tirx.BufferLoad is only a constructor function, so match by type name
        if type(node).__name__ in ("TensorLoad", "BufferLoad"):
            buffer = node.source if hasattr(node, "source") else getattr(node, "buffer", None)
            if str(getattr(buffer, "dtype", "")) == "bool":
                found.append(node)

    tvm_ffi.structural_walk(stmt, visit)
    return bool(found)


def serial_bool_loads_pass():
    """A module pass over scheduled PrimFuncs: vectorised loops that load bools become serial."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def serial(node):
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.VECTORIZED and _loads_bool(node.body):
            return tirx.For(node.loop_var, node.min, node.extent, tirx.ForKind.SERIAL, node.body,
                            node.thread_binding, node.annotations)
        return node

    @tvm.transform.module_pass(opt_level=0, name="EffcSerialBoolLoads")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and _loads_bool(func.body):
                mod[gv] = func.with_body(tvm_ffi.structural_map(func.body, serial))
        return mod

    return _pass
