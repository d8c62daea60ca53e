"""Fused attention on AVX-512 CPUs (effc.codegen.fused_attention, effc/kernels/attention_f32.c):
``softmax(mask(Q K^T * scale + bias)) V`` as one kernel reading the head-split views in place.

Each model is built with onnx.helper in the forms exporters write (a vit-style head split from a
[B, S, H*D] linear with an additive mask, a rank-3 [B*H, S, D] cross attention divided by sqrt(D),
a masked_fill causal form with -inf); the compiled module must take the attention-f32 rule and
agree with ONNX Runtime at 1e-4 scale-relative error on batches of 2, odd sizes and keys across
the kernel's 64-key panels. A chain it cannot take (a softmax read twice) stays unfused and
correct; a CPU without AVX-512 gets the unfused chain."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.verify import OrtRunner, deviation

pytest.importorskip("tvm")

TOL = 1e-4


def _host_has_avx512() -> bool:
    from effc.codegen.fused_attention import has_avx512
    from effc.codegen.target import make_target

    return has_avx512(make_target("llvm").tvm())


requires_avx512 = pytest.mark.skipif(not _host_has_avx512(), reason="this CPU lacks AVX-512")


class Graph:
    """A small graph under construction: initializers and nodes, each node named after its output."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.inits, self.nodes = [], []

    def const(self, name, array, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def weight(self, name, rows, cols):
        return self.const(name, self.rng.standard_normal((rows, cols)) / np.sqrt(rows))

    def node(self, op, inputs, out, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def heads(self, x, w, shape, perm, name):
        """Transpose(Reshape(x @ w, shape), perm): a head split from a linear's output."""
        flat = self.node("MatMul", [x, w], f"{name}_lin")
        return self.node("Transpose", [self.node("Reshape", [flat, self.const(f"{name}_shape", shape, np.int64)],
                                                 f"{name}_split")], name, perm=perm)

    def model(self, inputs, outputs):
        from effc.frontend.onnx import from_proto

        def info(name, dtype, shape):
            return helper.make_tensor_value_info(name, dtype, shape)

        graph = helper.make_graph(self.nodes, "g", [info(*i) for i in inputs], [info(*o) for o in outputs],
                                  self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return from_proto(proto)


def vit_style(seq=37, heads=3, d=16, batch=2):
    """x[B, S, H*D] -> q, k, v heads; (q @ k^T) * 0.25 + mask[B, 1, 1, S] -> softmax -> @ v -> merged
    heads [B, S, H*D] -> @ Wo. The key permute is [0, 2, 3, 1] (read as materialized), q's and v's
    [0, 2, 1, 3] (read in place), and the head merge is written in place."""
    g, width = Graph(), heads * d
    split = [batch, seq, heads, d]
    q = g.heads("x", g.weight("Wq", width, width), split, [0, 2, 1, 3], "q")
    kt = g.heads("x", g.weight("Wk", width, width), split, [0, 2, 3, 1], "kt")
    v = g.heads("x", g.weight("Wv", width, width), split, [0, 2, 1, 3], "v")
    scores = g.node("Add", [g.node("Mul", [g.node("MatMul", [q, kt], "qk"), g.const("scale", 0.25)], "scaled"),
                            "mask"], "biased")
    y = g.node("MatMul", [g.node("Softmax", [scores], "p", axis=-1), v], "pv")
    merged = g.node("Reshape", [g.node("Transpose", [y], "merge", perm=[0, 2, 1, 3]),
                                g.const("out_shape", [batch, seq, width], np.int64)], "merged")
    g.node("MatMul", [merged, g.weight("Wo", width, width)], "y")
    return g.model([("x", TensorProto.FLOAT, [batch, seq, width]), ("mask", TensorProto.FLOAT, [batch, 1, 1, seq])],
                   [("y", TensorProto.FLOAT, [batch, seq, width])])


def rank3_cross(bh=6, sq=5, sk=23, d=17, dv=9, read_twice=False, kt_input=False):
    """Rank-3 [B*H, S, D] cross attention: softmax(q @ transpose(k) / sqrt(d)) @ v, no bias;
    ``read_twice``: the probabilities are also an output (the chain cannot fuse); ``kt_input``: K^T
    is an input [B*H, D, S_k] (its rows read in place, no transpose in the kernel)."""
    g = Graph()
    kt = "kt" if kt_input else g.node("Transpose", ["k"], "kt", perm=[0, 2, 1])
    scores = g.node("Div", [g.node("MatMul", ["q", kt], "qk"), g.const("root_d", np.sqrt(d))], "scaled")
    p = g.node("Softmax", [scores], "p", axis=-1)
    g.node("MatMul", [p, "v"], "y")
    outputs = [("y", TensorProto.FLOAT, [bh, sq, dv])] + [("p", TensorProto.FLOAT, [bh, sq, sk])] * read_twice
    keys = ("kt", TensorProto.FLOAT, [bh, d, sk]) if kt_input else ("k", TensorProto.FLOAT, [bh, sk, d])
    return g.model([("q", TensorProto.FLOAT, [bh, sq, d]), keys, ("v", TensorProto.FLOAT, [bh, sk, dv])], outputs)


def causal_masked_fill(seq=70, heads=2, d=24, batch=2, additive=False):
    """torch's eager masked_fill form: Where(causal[1, 1, S, S], q @ k^T * 0.2, -inf), softmax, @ v;
    70 keys: two 64-key panels, the second ragged; q, k, v as [B, H, S, D] inputs. ``additive``: the
    causal mask as a constant float bias instead (0 below the diagonal, -1e4 above), added."""
    g = Graph()
    lower = np.tril(np.ones((seq, seq), bool))[None, None]
    kt = g.node("Transpose", ["k"], "kt", perm=[0, 1, 3, 2])
    scores = g.node("Mul", [g.node("MatMul", ["q", kt], "qk"), g.const("scale", 0.2)], "scaled")
    if additive:
        filled = g.node("Add", [scores, g.const("causal_bias", np.where(lower, 0.0, -1e4))], "filled")
    else:
        filled = g.node("Where", [g.const("causal", lower, bool), scores, g.const("neg_inf", -np.inf)], "filled")
    g.node("MatMul", [g.node("Softmax", [filled], "p", axis=-1), "v"], "y")
    shape = [batch, heads, seq, d]
    return g.model([(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")], [("y", TensorProto.FLOAT, shape)])


def _feeds(model, count=2, seed=3):
    from effc.verify import make_inputs

    feeds = make_inputs(model, count, seed=seed)
    for feed in feeds:
        if "mask" in feed:  # an additive padding mask: the last keys of batch 1 masked out as BERT does
            mask = np.zeros_like(feed["mask"])
            mask[1, ..., -7:] = -10000.0
            feed["mask"] = mask
    return feeds


def _compile_and_compare(model, tmp_path, target="llvm"):
    from effc.codegen.build import compile_model, run_compiled

    result = compile_model(model, target, tmp_path)
    feeds = _feeds(model)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.max_rel < TOL, dev
    return result


@requires_avx512
@pytest.mark.parametrize("build", [vit_style, rank3_cross, lambda: rank3_cross(sk=77, kt_input=True),
                                   causal_masked_fill, lambda: causal_masked_fill(additive=True)],
                         ids=["vit-style-additive-mask", "rank3-cross-div", "rank3-kt-rows-in-place",
                              "causal-masked-fill", "causal-constant-bias"])
def test_attention_fuses_and_matches_ort(build, tmp_path):
    result = _compile_and_compare(build(), tmp_path)
    assert result.rule_hits.get("attention-f32") == 1, result.kernels
    assert not any("softmax" in name for name in result.kernels), result.kernels


@requires_avx512
def test_vit_style_reads_head_split_in_place(tmp_path):
    """No layout kernel remains: q's, k's and v's head splits and the head merge are the fused
    kernel's strided reads and writes (the keys transposed per task)."""
    result = _compile_and_compare(vit_style(), tmp_path)
    layout = [name for name in result.kernels if "transpose" in name]
    assert not layout, result.kernels


@requires_avx512
def test_long_sequence_splits_rows_and_keys(tmp_path):
    """300 query rows of one head: several row tasks, P.V over five 64-key chunks."""
    result = _compile_and_compare(causal_masked_fill(seq=300, heads=1, d=64, batch=1), tmp_path)
    assert result.rule_hits.get("attention-f32") == 1


@requires_avx512
def test_a_softmax_read_twice_stays_unfused(tmp_path):
    result = _compile_and_compare(rank3_cross(read_twice=True), tmp_path)
    assert "attention-f32" not in result.rule_hits, result.kernels


def test_a_cpu_without_avx512_gets_the_unfused_chain(tmp_path):
    from effc.codegen.build import compile_model
    from effc.codegen.target import BuildTarget, llvm_target

    bt = BuildTarget("llvm", llvm_target(mcpu="haswell").spec, 1)  # AVX2, no AVX-512
    result = compile_model(rank3_cross(), bt, tmp_path)
    assert "attention-f32" not in result.rule_hits, result.kernels


def test_task_plan_balances_and_bounds_scratch():
    from effc.codegen.fused_attention import MR, SCRATCH_BYTES, _lds, task_plan

    assert task_plan(6, 197, 197, threads=2) == (6, 198)  # vit-s16, 2 threads: whole heads
    tasks, rows = task_plan(6, 197, 197, threads=16)  # more threads than heads: row chunks
    assert tasks >= 32 and rows % MR == 0 and rows * (tasks // 6) >= 197
    tasks, rows = task_plan(1, 8192, 8192)  # one long head: the scores stay bounded
    assert rows * _lds(8192) * 4 <= SCRATCH_BYTES and tasks * rows >= 8192
    assert task_plan(64, 1, 77) == (64, MR)  # a decode step: one row a task


@requires_avx512
def test_without_a_c_compiler_the_chain_stays_unfused(tmp_path, monkeypatch):
    """The unfused chain needs no C compiler, so an fp32 build keeps it rather than failing."""
    from effc.errors import EffcError
    from effc.kernels import native

    def no_compiler(name):
        raise EffcError("effc's C kernels need a C compiler")

    monkeypatch.setattr(native, "load", no_compiler)
    result = _compile_and_compare(rank3_cross(), tmp_path)
    assert "attention-f32" not in result.rule_hits, result.kernels
