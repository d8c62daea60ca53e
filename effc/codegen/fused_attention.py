"""Attention as one kernel on AVX-512 CPUs: ``softmax(mask(Q K^T * scale + bias)) V`` in fp32.

Unfused, the chain is four kernels around a [.., S, S] scores tensor that is written by Q.K^T, read
and written by the softmax and read again by P.V, and the head split of Q and V (a permute of the
linears' [B, S, H, D] output) and the head merge after P.V are layout kernels of their own. Here
the chain from the first matmul to the second becomes one call of effc/kernels/attention_f32.c,
which keeps a block of query rows' scores in cache and reads Q, K, V (and writes O) in place
through strides: permutes, unit-step slices (a fused qkv linear's Split pieces) and reshapes in
front of an operand are read as a view, not materialized. K^T's rows are read in place where they
are contiguous; where K's rows are (the head split of the key linear's output), each task
transposes its head's keys into its scratch.

Matched, on static float32 shapes of rank 3 or 4 (one batch axis, or batch and heads):
``matmul(softmax(where(mask, ., fill)?(matmul(Q, KT) [* or / scalar const] [+ bias]), axis=-1), V)``
with every intermediate used once: a float bias added (an additive mask), a bool mask with a
constant fill (masked_fill, either branch) or both; each may broadcast on any axis but the keys'.
A constant bias that is all zeros (an all-true mask) is dropped. A permute_dims(., [0, 2, 1, 3])
of the output (the head merge) is written in place as well. Anything else stays the unfused chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from effc.codegen.relax_rewrite import mutator_pass

RULE = "attention-f32"
SYMBOL = "effc_attention_f32"
MR = 6  # query rows per register tile (the C kernel's MR)
LANES = 16
TASKS_PER_THREAD = 2  # whole-head tasks a thread at least, else heads are split by rows
MIN_TASK_ROWS = 24
SCRATCH_BYTES = 1 << 20  # a task's scores: within L2 for the softmax and P.V that read them back


def has_avx512(target) -> bool:
    from effc.codegen.target import cpu_has

    return cpu_has(target, "avx512f")


def available(target) -> bool:
    """The kernel applies to ``target``: AVX-512, and the C kernel builds here (without a C
    compiler the unfused chain, which needs none, is kept rather than failing an fp32 build)."""
    from effc.errors import EffcError
    from effc.kernels import native

    if not has_avx512(target):
        return False
    try:
        native.load("attention_f32")  # the symbol, for modules built and run in this process
    except (EffcError, OSError):
        return False
    return True


def _static(shape) -> list[int] | None:
    from tvm import tirx

    dims = list(getattr(shape, "values", shape) or [])
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _op(expr) -> str | None:
    return getattr(getattr(expr, "op", None), "name", None)


def _contiguous(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return strides[::-1]


def _is_constant(expr) -> bool:
    from tvm.ir.expr import Constant

    return isinstance(expr, Constant)


def _scalar(expr) -> float | None:
    """The value of a one-element float32 constant, else None."""
    if _is_constant(expr):
        value = expr.value.numpy()
        if value.size == 1 and value.dtype == np.float32:
            return float(value.reshape(()))
    return None


@dataclass
class _Chain:
    """The matched chain of one attention: operands (Relax expressions), its scalar scale, the
    logical sizes (S_q, S_k, D, D_v) and the optional bias and mask (with its fill)."""

    q: object
    kt: object
    v: object
    scale: float
    sizes: tuple[int, int, int, int]
    bias: object = None
    mask: object = None
    mask_fills: int = -1  # the kernel's: 1 fill where the mask is true, 0 where false, -1 no mask
    fill: float = 0.0


def fused_attention_pass(threads: int = 1):
    """The rewrite, for a module to run on ``threads`` threads (the task split balances over them)."""
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class FuseAttention(PyExprMutator):
        def visit_function_(self, func):
            self.users, merges = {}, []
            for block in getattr(func.body, "blocks", []):
                if isinstance(block, relax.DataflowBlock):
                    for var, users in relax.analysis.udchain(block).items():
                        self.users[var] = len(users)
                    merges += [b.value.args[0] for b in block.bindings if _merges_heads(b.value)]
            # a product whose only user is a head merge is fused there, writing the merged layout
            self.merged_later = [v for v in merges if self.users.get(v) == 1]
            self.left = False  # the binding being visited is such a product
            return super().visit_function_(func)

        def visit_var_binding_(self, binding):
            self.left = any(binding.var.same_as(v) for v in self.merged_later)  # for the head merge
            super().visit_var_binding_(binding)
            self.left = False

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if self.left:
                return call
            merged = _merges_heads(call) and self._once(call.args[0])
            chain = self._chain(self.lookup_binding(call.args[0]) if merged else call)
            return call if chain is None else self._fused(chain, call, merged)

        # --- matching -----------------------------------------------------------------------
        def _once(self, var) -> bool:
            return isinstance(var, relax.Var) and self.users.get(var, 0) == 1

        def _bound(self, var, op: str):
            """What ``var`` (used once) is bound to, when that is a call of ``op``."""
            bound = self.lookup_binding(var) if self._once(var) else None
            return bound if _op(bound) == op else None

        def _chain(self, second) -> _Chain | None:
            if _op(second) != "relax.matmul" or _rank(second) not in (3, 4):
                return None
            probs, v = second.args
            softmax = self._bound(probs, "relax.nn.softmax")
            if softmax is None or int(softmax.attrs.axis) not in (-1, _rank(softmax) - 1):
                return None
            x, masked = softmax.args[0], {}
            where = self._bound(x, "relax.where")
            if where is not None and _dtype(where.args[0]) == "bool":
                cond, a, b = where.args
                if _scalar(b) is not None:  # where(mask, scores, fill)
                    x, masked = a, dict(mask=cond, mask_fills=0, fill=_scalar(b))
                elif _scalar(a) is not None:  # where(mask, fill, scores)
                    x, masked = b, dict(mask=cond, mask_fills=1, fill=_scalar(a))
            found = self._scores(x)
            added = self._bound(x, "relax.add")
            if found is None and added is not None:
                a, b = added.args
                found = self._scores(a, b) or self._scores(b, a)
            if found is None:
                return None
            (q, kt), scale, bias = found
            shapes = [_static(e.ty.shape) for e in (q, kt, v, second)]
            if any(s is None or len(s) != len(shapes[3]) for s in shapes):
                return None
            qs, ks, vs, os_ = shapes
            if not (qs[:-2] == ks[:-2] == vs[:-2] == os_[:-2] and qs[-1] == ks[-2] and ks[-1] == vs[-2]):
                return None
            if any(_dtype(e) != "float32" for e in (q, kt, v)):
                return None
            scores = qs[:-1] + [ks[-1]]
            if masked and not _broadcasts(masked["mask"], scores):
                return None
            if bias is not None:
                if _dtype(bias) != "float32" or not _broadcasts(bias, scores):
                    return None
                value = self._constant(bias)
                if value is not None and not value.any():  # a constant zero bias (an all-true mask)
                    bias = None
            return _Chain(q, kt, v, scale, (qs[-2], ks[-1], qs[-1], vs[-1]), bias, **masked)

        def _scores(self, x, bias=None):
            """((Q, K^T), scale, bias) when ``x`` is matmul(Q, K^T), scaled by a scalar constant or not."""
            scale = 1.0
            for op in ("relax.multiply", "relax.divide"):
                scaled = self._bound(x, op)
                if scaled is None:
                    continue
                a, b = scaled.args
                if op == "relax.divide" and _scalar(b):
                    x, scale = a, 1.0 / _scalar(b)
                elif op == "relax.multiply" and _scalar(b) is not None:
                    x, scale = a, _scalar(b)
                elif op == "relax.multiply" and _scalar(a) is not None:
                    x, scale = b, _scalar(a)
                break
            first = self._bound(x, "relax.matmul")
            return None if first is None else (tuple(first.args), scale, bias)

        def _constant(self, expr):
            """The value of a constant bias, a Constant or where() of constants (a mask's form), to
            tell a zero one; a non-zero one stays the graph's expression, one tensor every layer's
            kernel reads (shared by all of them where the graph shares it)."""
            if _is_constant(expr):
                return expr.value.numpy()
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            if _op(bound) == "relax.where" and all(_is_constant(a) for a in bound.args):
                cond, a, b = (arg.value.numpy() for arg in bound.args)
                return np.where(cond, a, b)
            return None

        # --- the call -------------------------------------------------------------------------
        def _fused(self, chain, call, merged: bool):
            q, kt, v = (self._view(e) for e in (chain.q, chain.kt, chain.v))
            if q.strides[-1] != 1 or v.strides[-1] != 1:
                return call
            if 1 not in kt.strides[-2:]:  # neither K^T's nor K's rows in place: K^T as the graph has it
                kt = View(chain.kt, _contiguous(_static(chain.kt.ty.shape)))
            out_shape = _static(call.ty.shape)
            contiguous = _contiguous(out_shape)
            o_strides = [contiguous[i] for i in (0, 2, 1, 3)] if merged else contiguous
            batch = out_shape[:len(out_shape) - 2] if not merged else [out_shape[0], out_shape[2]]
            # an absent bias or mask: Q stands in (never read)
            rank = len(out_shape)
            bias = View(q.base, [0] * rank) if chain.bias is None else \
                View(chain.bias, _broadcast_strides(chain.bias, rank))
            mask = View(q.base, [0] * rank) if chain.mask is None else \
                View(chain.mask, _broadcast_strides(chain.mask, rank))
            views = [q, kt, v, bias, mask]
            func = prim_func(batch, chain, threads, views, o_strides, out_shape)
            gv = self.builder_.add_func(func, "fused_attention")
            return relax.call_tir(gv, [view.base for view in views], relax.TensorType(out_shape, "float32"))

        def _view(self, expr):
            """View(base tensor, element strides of ``expr``'s axes in it, element offset): the
            permutes, unit-step slices (a Split's pieces) and reshapes in front of ``expr`` read in
            place; where a reshape would need a copy of a strided view, ``expr`` itself."""
            shape = _static(expr.ty.shape)
            itself = View(expr, _contiguous(shape), 0)
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            op = _op(bound)
            if op not in ("relax.permute_dims", "relax.reshape", "relax.strided_slice") or \
                    _static(bound.args[0].ty.shape) is None:
                return itself
            inner = self._view(bound.args[0])
            if op == "relax.permute_dims":
                return View(inner.base, _permuted(inner.strides, bound), inner.offset)
            if op == "relax.strided_slice":
                starts = _slice_starts(bound, len(inner.strides))
                if starts is None:
                    return itself
                return View(inner.base, inner.strides, inner.offset + sum(b * s for b, s in zip(starts, inner.strides)))
            strides = _reshaped(_static(bound.args[0].ty.shape), inner.strides, shape)
            return itself if strides is None else View(inner.base, strides, inner.offset)

    return mutator_pass(FuseAttention, "EffcFuseAttention")


def _merges_heads(expr) -> bool:
    """A permute_dims(x, [0, 2, 1, 3]) of a rank-4 x: [B, H, S, D] -> [B, S, H, D]."""
    if _op(expr) != "relax.permute_dims" or expr.attrs.axes is None:
        return False
    return [int(a) for a in expr.attrs.axes] == [0, 2, 1, 3]


@dataclass
class View:
    """An operand read in place: ``base``'s data from element ``offset`` on, with these strides."""

    base: object
    strides: list[int]
    offset: int = 0


def _slice_starts(call, rank: int) -> list[int] | None:
    """Per axis, where a strided_slice with unit steps and static bounds starts; None otherwise."""
    from tvm import relax

    def ints(arg):
        values = arg.fields if isinstance(arg, relax.Tuple) else getattr(arg, "values", None)
        try:
            return [int(getattr(v, "value", v)) for v in values]
        except (TypeError, ValueError):
            return None

    axes, begins = ints(call.args[1]), ints(call.args[2])
    steps = ints(call.args[4]) if len(call.args) > 4 else None
    if axes is None or begins is None or (steps is not None and any(st != 1 for st in steps)):
        return None
    shape = _static(call.args[0].ty.shape)
    starts = [0] * rank
    for axis, begin in zip(axes, begins):
        axis %= rank
        starts[axis] = begin + shape[axis] if begin < 0 else begin
    return starts


def _reshaped(in_shape: list[int], in_strides: list[int], out_shape: list[int]) -> list[int] | None:
    """Strides of reshape(x, out_shape) for x viewed with ``in_strides``: any shape where x is
    contiguous; for a strided view, only splitting its last axis (the head split [.., H*D] ->
    [.., H, D]); None where the reshape would need a copy."""
    if in_strides == _contiguous(in_shape):
        return _contiguous(out_shape)
    if out_shape[:-2] == in_shape[:-1] and out_shape[-2] * out_shape[-1] == in_shape[-1]:
        return in_strides[:-1] + [out_shape[-1] * in_strides[-1], in_strides[-1]]
    return None


def _broadcasts(expr, scores: list[int]) -> bool:
    """``expr`` (a bias or mask) broadcasts to the scores' shape along any axis but the keys'."""
    shape = _static(expr.ty.shape)
    if not shape or len(shape) > len(scores) or shape[-1] != scores[-1]:
        return False
    return all(have in (1, want) for have, want in zip(reversed(shape), reversed(scores)))


def _broadcast_strides(expr, rank: int) -> list[int]:
    """Element strides of a broadcast operand over the scores' ``rank`` axes: 0 where it broadcasts."""
    shape = _static(expr.ty.shape)
    full = [1] * (rank - len(shape)) + shape
    return [0 if n == 1 else s for n, s in zip(full, _contiguous(full))]


def _permuted(strides: list[int], permute) -> list[int]:
    axes = permute.attrs.axes
    return [strides[int(a)] for a in axes] if axes is not None else strides[::-1]


def _rank(expr) -> int:
    return int(getattr(expr.ty, "ndim", -1))


def _dtype(expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def task_plan(batches: int, sq: int, sk: int, threads: int = 1) -> tuple[int, int]:
    """(tasks, rows per task): whole heads where there are TASKS_PER_THREAD a thread of them (a task
    may transpose its head's keys: fewer, longer tasks do that once), else heads split into row
    chunks of whole register tiles; never more rows than keep a task's scores within SCRATCH_BYTES."""
    chunks = max(1, min(math.ceil(TASKS_PER_THREAD * threads / batches), math.ceil(sq / MIN_TASK_ROWS)))
    rows = math.ceil(math.ceil(sq / chunks) / MR) * MR
    rows = max(MR, min(rows, SCRATCH_BYTES // (4 * _lds(sk)) // MR * MR))
    return batches * math.ceil(sq / rows), rows


def _lds(sk: int) -> int:
    """A row of scores (or of transposed keys) in whole vectors."""
    return math.ceil(sk / LANES) * LANES


def scratch_floats(task_rows: int, sk: int, d: int, transposes: bool) -> int:
    """The C kernel's scratch: the task's rows of scores, a 1 / sum per row, K^T's d rows if it
    transposes the keys."""
    return task_rows * (_lds(sk) + 1) + (d * _lds(sk) if transposes else 0)


def prim_func(batch: list[int], chain: _Chain, threads: int, views: list[View], o_strides: list[int],
              out_shape: list[int]):
    """The kernel: a parallel loop over tasks, each calling the C kernel with scratch rows of its own.
    ``batch``: [B] or [B, H]; ``views``: Q, K^T, V, the bias and the mask as read in place (element
    strides, batch axes first, and offsets into their base tensors); ``o_strides``: O's."""
    from tvm.script import tirx as T

    from effc.codegen.custom_ops import _rooted

    sq, sk, d, dv = chain.sizes
    heads = batch[1] if len(batch) == 2 else 1
    tasks, task_rows = task_plan(int(np.prod(batch)), sq, sk, threads)
    strides = [view.strides for view in views] + [o_strides]
    (qb, qh), (kb, kh), (vb, vh), (bb, bh), (mb, mh), (ob, oh) = \
        ((s[0], s[1] if len(batch) == 2 else 0) for s in strides)
    qi, kd, vj, bi, mi, oi = (s[-2] for s in strides)
    kj = strides[1][-1]
    scratch_size = scratch_floats(task_rows, sk, d, kj != 1)
    shapes = [_static(view.base.ty.shape) for view in views]
    q_at, kt_at, v_at, bias_at, mask_at = (tuple(int(i) for i in np.unravel_index(view.offset, shape))
                                           for view, shape in zip(views, shapes))
    q_shape, kt_shape, v_shape, bias_shape, mask_shape = shapes
    mask_dtype = _dtype(views[4].base)
    has_bias, fills, fill, scale = int(chain.bias is not None), chain.mask_fills, chain.fill, chain.scale

    @T.prim_func(s_tir=True)
    def fused_attention(q: T.Buffer(q_shape, "float32"), kt: T.Buffer(kt_shape, "float32"),
                        v: T.Buffer(v_shape, "float32"), bias: T.Buffer(bias_shape, "float32"),
                        mask: T.Buffer(mask_shape, mask_dtype), o: T.Buffer(out_shape, "float32")):
        T.func_attr({"global_symbol": "fused_attention", "tirx.noalias": True})
        for t in T.parallel(tasks):
            scratch = T.alloc_buffer((scratch_size,), "float32")
            T.evaluate(T.call_extern("int32", SYMBOL, T.address_of(q[q_at]), T.address_of(kt[kt_at]),
                                     T.address_of(v[v_at]), T.address_of(bias[bias_at]),
                                     T.address_of(mask[mask_at]), o.data, scratch.data, heads, sq, sk, d, dv,
                                     T.float32(scale), T.int64(qb), T.int64(qh), T.int64(qi), T.int64(kb),
                                     T.int64(kh), T.int64(kd), T.int64(kj), T.int64(vb), T.int64(vh),
                                     T.int64(vj), T.int64(bb), T.int64(bh), T.int64(bi), T.int64(ob),
                                     T.int64(oh), T.int64(oi), T.int64(mb), T.int64(mh), T.int64(mi), has_bias,
                                     fills, T.float32(fill), t, task_rows))

    return _rooted(fused_attention).without_attr("global_symbol").with_attrs(
        {"tirx.is_scheduled": 1, "op_pattern": 8, "effc.rule": RULE})
