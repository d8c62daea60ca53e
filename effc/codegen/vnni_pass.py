"""Replace the int8 matmul rule's marked 16 x 4 inner step by one ``vpdpbusd``.

``Schedule.tensorize`` segfaults in this TVM wheel (0.27.0.post1, any intrinsic, even TVM's own
dot_16x4_vnni), so the int8 rule (schedules/cpu/int8_matmul.py) marks the loop instead and this TIR
pass, run before TVM's own lowering, does the substitution itself: the marked loop must be

    for j in 16: for k in 4: block: C[.., c + j] += int32(A[.., a + k]) * int32(B[.., b_j + j, k])

(A u8 and B s8, or A s8 and B u8: vpdpbusd's unsigned operand is then B's panel)

with C and A contiguous along j and k and B's last two dims [.., 16 * t, 4]; it becomes

    C[.., c:c+16] = vpdpbusd(C[.., c:c+16], broadcast(A[.., a:a+4] as int32), B[.., b_j, 0:64])

(the block's predicate, a row-tail bound, is kept as an if). A loop that does not have this form is
left as it is (scalar but correct) and counted in ``skipped``.
"""

from __future__ import annotations

MARK = "effc.vnni_dot_16x4"
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def vnni_pass(stats: dict | None = None):
    """A TIR module pass; ``stats`` (optional) counts ``replaced`` and ``skipped`` loops."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    stats = stats if stats is not None else {}

    @tvm.transform.module_pass(opt_level=0, name="EffcVnniDot")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            found = []

            def visit(node):
                if isinstance(node, tirx.For) and node.annotations is not None and MARK in node.annotations:
                    new = _replace(node)
                    key = "skipped" if new is None else "replaced"
                    stats[key] = stats.get(key, 0) + 1
                    found.append(key)
                    return node if new is None else new
                return node

            body = tvm_ffi.structural_map(func.body, visit)
            if found:
                mod[gv] = func.with_body(body)
        return mod

    return _pass


def _replace(loop_j):
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad

    loop_k = loop_j.body
    if not isinstance(loop_k, tirx.For) or _int(loop_j.extent) != 16 or _int(loop_k.extent) != 4:
        return None
    realize = loop_k.body
    from tvm import s_tir

    if not isinstance(realize, s_tir.SBlockRealize):
        return None
    block = realize.block
    store = block.body
    if not isinstance(store, tirx.BufferStore) or block.init is not None:
        return None
    bind = {iv.var: value for iv, value in zip(block.iter_vars, realize.iter_values)}
    j, k = loop_j.loop_var, loop_k.loop_var
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()

    def at(expr, jv, kv):
        mapping = {**bind}
        sub = tvm_ffi.structural_map(expr, lambda n: mapping.get(n, n) if isinstance(n, tirx.Var) else n)
        sub = tvm_ffi.structural_map(sub, lambda n: (_c(n, jv) if n.same_as(j) else _c(n, kv) if n.same_as(k)
                                                     else n) if isinstance(n, tirx.Var) else n)
        return analyzer.simplify(sub)

    def strides(indices):  # per dim: (index at j=k=0, step along j, step along k)
        base = [at(e, 0, 0) for e in indices]
        dj = [_int(analyzer.simplify(at(e, 1, 0) - b)) for e, b in zip(indices, base)]
        dk = [_int(analyzer.simplify(at(e, 0, 1) - b)) for e, b in zip(indices, base)]
        return base, dj, dk

    value = store.value
    if not isinstance(value, tirx.Add) or not isinstance(value.b, tirx.Mul):
        return None
    acc, prod = value.a, value.b
    loads = [_cast_load(prod.a), _cast_load(prod.b)]
    if not isinstance(acc, TensorLoad) or not acc.source.same_as(store.buffer) or None in loads:
        return None
    a, b = loads
    if str(store.buffer.dtype) != "int32" or \
            {str(a.source.dtype), str(b.source.dtype)} != {"uint8", "int8"}:
        return None
    c_base, c_dj, c_dk = strides(store.indices)
    a_base, a_dj, a_dk = strides(a.indices)
    b_base, b_dj, b_dk = strides(b.indices)
    if c_dj != [0] * (len(c_dj) - 1) + [1] or any(c_dk):
        return None
    if any(a_dj) or a_dk != [0] * (len(a_dk) - 1) + [1]:
        return None
    if len(b_dj) < 2 or b_dj != [0] * (len(b_dj) - 2) + [1, 0] or b_dk != [0] * (len(b_dk) - 1) + [1] \
            or _int(b.source.shape[-1]) != 4 or _int(b_base[-1]) != 0:
        return None
    dtype = c_base[-1].ty if hasattr(c_base[-1], "ty") else "int32"
    ramp = lambda base, lanes: tirx.Ramp(base, tirx.IntImm(str(dtype), 1), lanes)  # noqa: E731
    c_idx = c_base[:-1] + [ramp(c_base[-1], 16)]
    a_vec = tirx.BufferLoad(a.source, a_base[:-1] + [ramp(a_base[-1], 4)])
    b_vec = tirx.BufferLoad(b.source, b_base[:-1] + [ramp(b_base[-1], 64)])  # 16 rows x 4 bytes, flattened
    a_word = tirx.reinterpret("int32", a_vec)
    broadcast = tirx.reinterpret("int8x64", tirx.Broadcast(a_word, 16))
    # vpdpbusd's first operand is the unsigned one: the broadcast row of A (a linear's u8
    # activation) or the packed panel of B (a conv's u8 im2col, A its s8 weight)
    unsigned, signed = (broadcast, b_vec) if str(a.source.dtype) == "uint8" else \
        (tirx.reinterpret("int8x64", b_vec), broadcast)
    dot = tirx.call_llvm_pure_intrin("int32x16", VPDPBUSD, tirx.BufferLoad(store.buffer, c_idx), unsigned, signed)
    new = tirx.BufferStore(store.buffer, dot, c_idx)
    predicate = at(realize.predicate, 0, 0)
    if not (isinstance(predicate, tirx.IntImm) and predicate.value == 1):
        new = tirx.IfThenElse(predicate, new, None)
    return new


def _cast_load(expr):
    from tvm import tirx
    from tvm.ir.expr import TensorLoad

    if isinstance(expr, tirx.Cast) and str(expr.ty) == "int32" and isinstance(expr.value, TensorLoad):
        return expr.value
    return None


def _c(var, value: int):
    from tvm import tirx

    return tirx.IntImm(str(var.ty) if hasattr(var, "ty") else "int64", value)


def _int(expr) -> int | None:
    value = getattr(expr, "value", None)
    return int(value) if value is not None else None
