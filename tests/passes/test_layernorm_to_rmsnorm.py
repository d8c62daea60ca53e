"""layernorm-to-rmsnorm: rewrite counts, resulting graphs, refusals and agreement with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from effc.frontend.onnx import from_proto
from effc.frontend.torch import from_torch
from effc.ir import const_value, copy_model, op_counts, to_proto
from effc.passes import get_pass
from effc.passes._norm_sites import convert, find_sites
from effc.passes.base import PassContext
from effc.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from effc.verify import OrtRunner, deviation, make_inputs

TOLERANCE = LayerNormToRMSNorm.tolerance


# --- tiny torch transformers ----------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, d: int, heads: int = 2, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PreLNBlock(nn.Module):
    def __init__(self, d: int, layer_scale: bool = False, causal: bool = True):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), Attention(d, causal=causal)
        self.ln_2, self.mlp = nn.LayerNorm(d), MLP(d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None

    def forward(self, x):
        a = self.attn(self.ln_1(x))
        x = x + (a * self.gamma if self.gamma is not None else a)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Pre-LN GPT: token + position embeddings, 2 blocks, final LN, LM head tied to the embedding."""

    def __init__(self, vocab: int = 50, length: int = 8, d: int = 16, blocks: int = 2, probe: bool = False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.ModuleList(PreLNBlock(d) for _ in range(blocks))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.probe = nn.Linear(d, vocab) if probe else None  # reads the stream without a LayerNorm

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits + self.probe(x) if self.probe is not None else logits


class TinyViT(nn.Module):
    """Pre-LN ViT: Conv patch embed -> flatten -> transpose, cls token, position embedding, LayerScale."""

    def __init__(self, d: int = 16, patch: int = 4, image: int = 8, classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList([PreLNBlock(d, layer_scale=True, causal=False), PreLNBlock(d, causal=False)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)[:, 0])


class TinyBERT(nn.Module):
    """Post-LN: the LayerNorm comes after each residual add, so LayerNorms write the stream."""

    def __init__(self, vocab: int = 50, length: int = 8, d: int = 16):
        super().__init__()
        self.wte, self.wpe, self.ln_emb = nn.Embedding(vocab, d), nn.Embedding(length, d), nn.LayerNorm(d)
        self.attn, self.ln_1, self.mlp, self.ln_2 = Attention(d, causal=False), nn.LayerNorm(d), MLP(d), nn.LayerNorm(d)

    def forward(self, idx):
        x = self.ln_emb(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial LN affines and offsets on every parameter, so skipping a recentring cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2 + 0.3)
    return module.eval()


def export(module: nn.Module, example: torch.Tensor, opset: int = 23):
    torch.manual_seed(0)
    return from_torch(randomise(module), (example,), opset=opset)


TOKENS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[23, 18])
def gpt(request):
    torch.manual_seed(0)
    return export(TinyGPT(), TOKENS, request.param)


@pytest.fixture(scope="module", params=[23, 18])
def vit(request):
    torch.manual_seed(0)
    return export(TinyViT(), torch.randn(2, 3, 8, 8), request.param)


# --- helpers --------------------------------------------------------------------------------

def convert_copy(model, **options):
    """Run the pass on a copy; return (original, converted, outcome)."""
    converted = copy_model(model)
    outcome = LayerNormToRMSNorm().run(converted, PassContext(options=options))
    return model, converted, outcome


def max_rel(original, converted) -> float:
    feeds = make_inputs(original, count=2, seed=1)
    return deviation(OrtRunner(converted).run_all(feeds), OrtRunner(original).run_all(feeds)).max_rel


def assert_refused(model, *reason_parts, **options):
    before = to_proto(model).SerializeToString()
    outcome = LayerNormToRMSNorm().run(model, PassContext(options=options))
    assert outcome.rewrites == []
    assert outcome.skipped, "a refusal must say why"
    reasons = " | ".join(s.reason for s in outcome.skipped)
    for part in reason_parts:
        assert part in reasons, reasons
    assert to_proto(model).SerializeToString() == before, "a refused model must be left unchanged"
    return outcome


def ln_count(model) -> int:
    return op_counts(model).get("LayerNormalization", 0)


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
    assert sum((r.action == "recentre" and r.details["op"] == "MatMul") for r in outcome.rewrites) == 4
    assert sum((r.action == "recentre" and r.details["op"] == "Gather") for r in outcome.rewrites) == 1
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
    assert any((r.action == "recentre" and r.details["op"] == "Conv") and [x["role"] for x in r.details["roles"]] == ["weight", "bias"]
               for r in outcome.rewrites)
    assert any((r.action == "recentre" and r.details["op"] == "Concat") for r in outcome.rewrites)  # the cls token
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
    assert sum((r.action == "recentre" and r.details["op"] == "Gemm") for r in outcome.rewrites) == 4  # c_proj of attn and mlp
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

class Graph:
    """A tiny onnx.helper graph builder: stream = E[ids] + P (+ c), blocks, final norm, head."""

    def __init__(self, d: int, seed: int = 0, vocab: int = 11, length: int = 5):
        self.d, self.vocab, self.length = d, vocab, length
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.opset = [], [], 17

    def const(self, name, array):
        array = np.asarray(array)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32 if array.dtype.kind == "f" else np.int64), name))
        return name

    def rand(self, name, *shape, offset=0.3):
        return self.const(name, self.rng.standard_normal(shape) * 0.5 + offset)

    def op(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def reduce_mean(self, x, name):  # axes moved from an attribute to an input in opset 18
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(f"{name}.axes", np.array([-1]))], name)
        return self.op("ReduceMean", [x], name, axes=[-1])

    def layer_norm(self, x, name, eps, style="op"):
        gamma, beta = self.rand(f"{name}.g", self.d, offset=1.0), self.rand(f"{name}.b", self.d, offset=0.0)
        if style == "op":
            return self.op("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=eps)
        mean = self.reduce_mean(x, f"{name}.mean")
        centred = self.op("Sub", [x, mean], f"{name}.sub")
        if style == "pow-div":
            square = self.op("Pow", [centred, self.const(f"{name}.two", np.float32(2))], f"{name}.pow")
        else:
            square = self.op("Mul", [centred, centred], f"{name}.square")
        var = self.reduce_mean(square, f"{name}.var")
        std = self.op("Sqrt", [self.op("Add", [var, self.const(f"{name}.eps", np.float32(eps))], f"{name}.addeps")],
                      f"{name}.std")
        if style == "pow-div":
            normed = self.op("Div", [centred, std], f"{name}.div")
        else:
            normed = self.op("Mul", [self.op("Reciprocal", [std], f"{name}.recip"), centred], f"{name}.scale")
        return self.op("Add", [self.op("Mul", [normed, gamma], f"{name}.mul"), beta], f"{name}.add")

    def stream_model(self, eps=1e-5, blocks=2, style="op", tied=False, offset=True, opset=17, extra_output=False,
                     pool_first=False, table_output=False, embed_norm=False, embed_norm_op="LayerNormalization",
                     embed_probe=False, merge_tokens=False):
        d, self.opset = self.d, opset
        x = self.op("Gather", [self.rand("E", self.vocab, d), "ids"], "wte")
        x = self.op("Add", [x, self.rand("P", self.length, d)], "add_pos")
        if offset:  # a per-token constant: LayerNorm ignores it, so the pass zeroes it
            x = self.op("Add", [x, self.const("c", np.full([1], 0.7, np.float32))], "add_offset")
        extra = []
        if embed_norm:  # the stream starts at a norm (a patch-embedding norm)
            if embed_norm_op == "LayerNormalization":
                x = self.layer_norm(x, "ln_emb", eps, style)
            else:
                x = self.op(embed_norm_op, [x, self.rand("ln_emb.g", d, offset=1.0)], "ln_emb", axis=-1, epsilon=eps)
        if embed_probe:  # a block reading the normalised stream directly, as post-LN blocks do
            extra.append((self.op("MatMul", [x, self.rand("W_probe", d, d)], "probe"), [2, self.length, d]))
        for i in range(blocks):
            h = self.layer_norm(x, f"ln{i}", eps, style)
            h = self.op("Relu", [self.op("Add", [self.op("MatMul", [h, self.rand(f"W1_{i}", d, 2 * d)], f"fc1_{i}"),
                                                 self.rand(f"b1_{i}", 2 * d)], f"fc1b_{i}")], f"act_{i}")
            h = self.op("Add", [self.op("MatMul", [h, self.rand(f"W2_{i}", 2 * d, d)], f"fc2_{i}"),
                                self.rand(f"b2_{i}", d)], f"fc2b_{i}")
            x = self.op("Add", [x, h], f"res_{i}")
        if pool_first:  # read the first token only, before the final norm (a cls-token head)
            x = self.op("Gather", [x, self.const("first", np.array(0))], "pool", axis=1)
        head = self.op("Transpose", ["E"], "head_t", perm=[1, 0]) if tied else self.rand("H", d, self.vocab)
        if merge_tokens:  # Swin's patch merging: two tokens side by side on the hidden axis, then a norm
            first, second = (self.op("Gather", [x, self.const(f"token{i}", np.array(i))], f"take{i}", axis=1)
                             for i in (0, 1))
            merged = self.op("Concat", [first, second], "merge", axis=-1)
            gamma, beta = self.rand("ln_merge.g", 2 * d, offset=1.0), self.rand("ln_merge.b", 2 * d, offset=0.0)
            normed = self.op("LayerNormalization", [merged, gamma, beta], "ln_merge", axis=-1, epsilon=eps)
            self.op("MatMul", [normed, self.rand("H2", 2 * d, self.vocab)], "logits")
        else:
            self.op("MatMul", [self.layer_norm(x, "ln_f", eps, style), head], "logits")
        pooled = pool_first or merge_tokens
        outputs = [("logits", [2, self.vocab] if pooled else [2, self.length, self.vocab])] + extra
        if table_output:  # a reader of the table that is not an LM head: only untying keeps it exact
            outputs.append((self.op("Abs", ["E"], "table_abs"), [self.vocab, d]))
        return self.model(outputs + ([(x, [2, self.length, d])] if extra_output else []), opset)

    def model(self, outputs, opset):
        """``outputs``: (name, shape) pairs of float outputs."""
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, self.length])]
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs]
        graph = helper.make_graph(self.nodes, "g", inputs, outputs, self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 8
        return from_proto(proto)


@pytest.mark.parametrize("style", ["pow-div", "mul-reciprocal"])
def test_decomposed_layernorm_converts(style):
    model = Graph(d=8).stream_model(style=style, opset=17)
    assert ln_count(model) == 0 and op_counts(model)["ReduceMean"] == 6
    original, converted, outcome = convert_copy(model)
    counts = op_counts(converted)
    assert counts["ReduceMean"] == 3 and "Sub" not in counts  # only the mean subtractions went
    assert sum(r.action == "to-rms" and r.details["decomposed"] for r in outcome.rewrites) == 3
    assert any(x["zeroed"] for r in outcome.rewrites if r.action == "recentre" for x in r.details["roles"])  # the per-token offset c
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
