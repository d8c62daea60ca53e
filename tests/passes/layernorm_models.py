"""Tiny pre-LN / post-LN transformers (torch) and a hand-built graph builder for the
layernorm-to-rmsnorm tests, with the helpers that run the pass and check its refusals."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from effc.frontend.onnx import from_proto
from effc.frontend.torch import from_torch
from effc.ir import copy_model, op_counts, to_proto
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


def recentred(outcome, op: str) -> list:
    """The rewrites that recentred a constant of an ``op`` node."""
    return [r for r in outcome.rewrites if r.action == "recentre" and r.details["op"] == op]


def zeroed_roles(outcome) -> list[str]:
    """The recentred constants that were the same for every channel (recentring zeroed them)."""
    return [x["role"] for r in outcome.rewrites if r.action == "recentre" for x in r.details["roles"] if x["zeroed"]]


def ln_count(model) -> int:
    return op_counts(model).get("LayerNormalization", 0)


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
