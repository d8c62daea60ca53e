"""layernorm-to-rmsnorm: rewrite counts, resulting graphs, refusals and agreement with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from torch import nn

from effc.frontend.torch import from_torch
from effc.ir import const_value, copy_model, op_counts, to_proto
from effc.passes import get_pass
from effc.passes._norm_sites import convert, find_sites
from effc.passes.base import PassContext
from effc.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from tests.passes.layernorm_models import (
    Graph,
    TOKENS,
    TOLERANCE,
    TinyBERT,
    TinyGPT,
    TinyViT,
    assert_refused,
    convert_copy,
    export,
    ln_count,
    max_rel,
    recentred,
    zeroed_roles,
)


@pytest.fixture(scope="module", params=[23, 18])
def gpt(request):
    torch.manual_seed(0)
    return export(TinyGPT(), TOKENS, request.param)


@pytest.fixture(scope="module", params=[23, 18])
def vit(request):
    torch.manual_seed(0)
    return export(TinyViT(), torch.randn(2, 3, 8, 8), request.param)


# --- positive: pre-LN models convert exactly ------------------------------------------------

def test_gpt_converts_every_layernorm(gpt):
    original, converted, outcome = convert_copy(gpt)
    opset = int(gpt.opset_imports[""])
    counts = op_counts(converted)
    assert ln_count(gpt) == 5 and "LayerNormalization" not in counts
    if opset >= 23:
        assert counts["RMSNormalization"] == 5
    else:
        assert "RMSNormalization" not in counts and counts["Sqrt"] == 5 and counts["Pow"] == 5
    # 5 norms + writers: wte table, wpe constant, and per block out/fc2 weight + bias.
    assert len(outcome.rewrites) == 5 + 10, outcome.rewrites
    assert len(recentred(outcome, "MatMul")) == 4
    assert len(recentred(outcome, "Gather")) == 1
    assert outcome.skipped == []
    onnx.checker.check_model(to_proto(converted), full_check=True)
    assert max_rel(original, converted) <= TOLERANCE


def test_recentred_embedding_rows_are_zero_mean(gpt):
    _, converted, _ = convert_copy(gpt)
    gather = next(n for n in converted.graph if n.op_type == "Gather" and const_value(n.inputs[0]) is not None)
    table = const_value(gather.inputs[0])
    assert np.abs(table.mean(axis=-1)).max() < 1e-6
    assert np.abs(const_value(next(n for n in gpt.graph if n.op_type == "Gather").inputs[0]).mean(-1)).max() > 0.1


def test_swapping_norms_without_recentring_is_not_exact(gpt):
    """Control: the differential check can fail, so the positive tests mean something."""
    naive = copy_model(gpt)
    sites, _ = find_sites(naive.graph)
    for site in sites:
        convert(site, naive.graph, int(naive.opset_imports[""]))
    assert max_rel(gpt, naive) > 1e-2


def test_converted_model_is_a_fixed_point(gpt):
    _, converted, _ = convert_copy(gpt)
    again = LayerNormToRMSNorm().run(converted, PassContext())
    assert again.rewrites == [] and again.skipped == []


def test_vit_with_layer_scale_converts(vit):
    original, converted, outcome = convert_copy(vit)
    assert ln_count(converted) == 0 and outcome.skipped == []
    assert any([x["role"] for x in r.details["roles"]] == ["weight", "bias"] for r in recentred(outcome, "Conv"))
    assert any(recentred(outcome, "Concat"))  # the cls token
    assert sum(r.action == "fold-layerscale" for r in outcome.rewrites) == 1
    reads_gamma = [n for n in converted.graph for v in n.inputs if v is not None and v.name == "blocks.0.gamma"]
    assert reads_gamma == [] and "blocks.0.gamma" not in converted.graph.initializers  # folded and dropped
    assert max_rel(original, converted) <= TOLERANCE


def test_huggingface_gpt2_converts():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    lm = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases and unit LNs: make them count
        for name, p in lm.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(torch.randn(p.shape) * 0.1)

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    model = from_torch(Logits(), (torch.randint(0, 100, (1, 8)),))
    original, converted, outcome = convert_copy(model)
    assert ln_count(original) == 5 and ln_count(converted) == 0 and outcome.skipped == []
    assert len(recentred(outcome, "Gemm")) == 4  # c_proj of attn and mlp
    assert max_rel(original, converted) <= TOLERANCE


# --- negative: models the pass must refuse --------------------------------------------------

def test_post_ln_is_refused_whole():
    model = export(TinyBERT(), TOKENS)
    outcome = assert_refused(model, "post-LN")
    assert len(outcome.skipped) == 3 and all("post-LN" in s.reason for s in outcome.skipped)
    assert any("held back" in s.reason for s in outcome.skipped)  # the embedding LN alone would convert


def test_stream_read_without_a_layernorm_is_refused():
    torch.manual_seed(0)
    model = export(TinyGPT(probe=True), TOKENS)
    assert_refused(model, "is read by", "without a LayerNorm")


# --- hand-built graphs: decomposed LN, tied weights, odd readers ----------------------------

@pytest.mark.parametrize("style", ["pow-div", "mul-reciprocal"])
def test_decomposed_layernorm_converts(style):
    model = Graph(d=8).stream_model(style=style, opset=17)
    assert ln_count(model) == 0 and op_counts(model)["ReduceMean"] == 6
    original, converted, outcome = convert_copy(model)
    counts = op_counts(converted)
    assert counts["ReduceMean"] == 3 and "Sub" not in counts  # only the mean subtractions went
    assert sum(r.action == "to-rms" and r.details["decomposed"] for r in outcome.rewrites) == 3
    assert zeroed_roles(outcome)  # the per-token offset c
    assert max_rel(original, converted) <= TOLERANCE


@pytest.mark.parametrize("opset", [17, 18, 23])
def test_layernorm_lowering_follows_the_opset(opset):
    original, converted, outcome = convert_copy(Graph(d=8).stream_model(opset=opset))
    counts = op_counts(converted)
    if opset >= 23:  # RMSNormalization exists from opset 23
        assert counts["RMSNormalization"] == 3 and "ReduceMean" not in counts
    else:  # ReduceMean takes its axes as an attribute below opset 18, as an input from 18
        means = [n for n in converted.graph if n.op_type == "ReduceMean"]
        assert len(means) == 3 and "RMSNormalization" not in counts
        assert all(("axes" in n.attributes) == (opset < 18) and (len(n.inputs) == 2) == (opset >= 18) for n in means)
    assert max_rel(original, converted) <= TOLERANCE


def test_stream_read_through_a_token_gather_converts():
    original, converted, outcome = convert_copy(Graph(d=8).stream_model(pool_first=True))
    assert ln_count(converted) == 0 and outcome.skipped == []
    assert max_rel(original, converted) <= TOLERANCE


def test_stream_leaking_through_another_split_output_is_refused():
    g = Graph(d=8)
    x = g.op("Gather", [g.rand("E", g.vocab, g.d), "ids"], "wte")
    sizes = g.const("sizes", np.array([2, 3]))
    g.nodes.append(helper.make_node("Split", [x, sizes], ["head", "tail"], name="split", axis=1))
    g.op("LayerNormalization", ["head", g.rand("g", g.d), g.rand("b", g.d)], "ln", axis=-1)
    g.op("MatMul", ["tail", g.rand("W", g.d, g.d)], "raw")
    model = g.model([("ln", [2, 2, g.d]), ("raw", [2, 3, g.d])], 18)
    assert_refused(model, "output 'tail' of Split 'split' carries the stream without a LayerNorm")


def test_tied_lm_head_stays_tied_with_a_correction():
    model = Graph(d=8).stream_model(tied=True)
    original, converted, outcome = convert_copy(model)
    assert ln_count(converted) == 0
    assert sum((r.action, r.node) == ("keep-tied", "E") for r in outcome.rewrites) == 1, outcome.rewrites
    transpose = next(n for n in converted.graph if n.op_type == "Transpose")
    gather = next(n for n in converted.graph if n.op_type == "Gather")
    assert transpose.inputs[0] is gather.inputs[0]  # one table for both readers
    table = const_value(gather.inputs[0])
    np.testing.assert_allclose(table.mean(axis=1), 0, atol=1e-6)
    assert op_counts(converted)["ReduceSum"] == 1
    assert [o.name for o in converted.graph.outputs] == ["logits"]
    assert max_rel(original, converted) <= TOLERANCE
    onnx.checker.check_model(to_proto(converted), full_check=True)  # the corrected output keeps its type


def test_tied_table_with_another_reader_is_untied():
    model = Graph(d=8).stream_model(tied=True, table_output=True)
    original, converted, outcome = convert_copy(model)
    assert ln_count(converted) == 0
    assert sum((r.action, r.node) == ("untie", "E") for r in outcome.rewrites) == 1, outcome.rewrites
    transpose = next(n for n in converted.graph if n.op_type == "Transpose")
    gather = next(n for n in converted.graph if n.op_type == "Gather")
    assert transpose.inputs[0].name == "E" and gather.inputs[0].name != "E"  # the other readers keep the original
    np.testing.assert_array_equal(const_value(transpose.inputs[0]), const_value(next(
        n for n in original.graph if n.op_type == "Transpose").inputs[0]))
    assert max_rel(original, converted) <= TOLERANCE


def test_tied_embedding_is_refused_without_untie():
    assert_refused(Graph(d=8).stream_model(tied=True, table_output=True), "tied weight 'E'", untie=False)


def test_tied_lm_head_needs_no_untie():
    _, converted, outcome = convert_copy(Graph(d=8).stream_model(tied=True), untie=False)
    assert ln_count(converted) == 0 and any((r.action, r.node) == ("keep-tied", "E") for r in outcome.rewrites)


def test_stream_graph_output_is_refused():
    assert_refused(Graph(d=8).stream_model(extra_output=True), "graph output")


def test_layernorm_over_two_axes_is_refused():
    g = Graph(d=8)
    x = g.op("Gather", [g.rand("E", g.vocab, g.d), "ids"], "wte")
    h = g.op("LayerNormalization", [x, g.rand("g", g.length, g.d), g.rand("b", g.length, g.d)], "ln", axis=1)
    s = g.op("Add", [x, g.op("MatMul", [h, g.rand("W", g.d, g.d)], "proj")], "res")
    g.op("LayerNormalization", [s, g.rand("g2", g.d), g.rand("b2", g.d)], "ln_f", axis=-1)
    outcome = assert_refused(g.model([("ln_f", [2, g.length, g.d])], 17), "not over the last axis",
                             "read by LayerNormalization 'ln' without a LayerNorm")
    assert {s.node for s in outcome.skipped} == {"ln", "ln_f"}


def test_model_without_layernorm_is_untouched():
    g = Graph(d=8)
    g.op("MatMul", [g.op("Gather", [g.rand("E", g.vocab, g.d), "ids"], "wte"), g.rand("H", g.d, g.vocab)], "logits")
    model = g.model([("logits", [2, g.length, g.vocab])], 17)
    outcome = LayerNormToRMSNorm().run(model, PassContext())
    assert outcome.rewrites == [] and outcome.skipped == []


def test_registered_under_its_name():
    p = get_pass("layernorm-to-rmsnorm")
    assert isinstance(p, LayerNormToRMSNorm) and p.exact


@settings(max_examples=12, deadline=None)
@given(d=st.integers(2, 24), eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]), blocks=st.integers(1, 3),
       opset=st.sampled_from([17, 18, 23]), style=st.sampled_from(["op", "pow-div"]), seed=st.integers(0, 2**16),
       embed_norm=st.booleans())
def test_exact_over_shapes_eps_and_depth(d, eps, blocks, opset, style, seed, embed_norm):
    model = Graph(d=d, seed=seed).stream_model(eps=eps, blocks=blocks, style=style, opset=opset, embed_norm=embed_norm)
    original, converted, outcome = convert_copy(model)
    assert outcome.skipped == [] and ln_count(converted) == 0
    # norms + Gather table, P, zeroed c, and per block W2 and b2 (+ the embedding norm and its centring).
    assert len(outcome.rewrites) == (blocks + 1) + 3 + 2 * blocks + 2 * embed_norm, outcome.rewrites
    assert max_rel(original, converted) <= TOLERANCE
