"""layernorm-to-rmsnorm on streams that start at a LayerNorm (a patch-embedding norm, CLIP's
pre-norm): converted with one explicit centring; post-LN and the other refusals name what they found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effc.ir import op_counts
from tests.passes.layernorm_models import (
    TOKENS,
    TOLERANCE,
    Graph,
    PreLNBlock,
    TinyBERT,
    assert_refused,
    convert_copy,
    export,
    ln_count,
    max_rel,
)


class NormedPatchViT(nn.Module):
    """Pre-LN ViT whose stream starts at a LayerNorm after the patch embedding (Swin/CLIP style)."""

    def __init__(self, d: int = 12, patch: int = 3, image: int = 9, classes: int = 5):
        super().__init__()
        self.patch, self.norm = nn.Conv2d(3, d, patch, stride=patch), nn.LayerNorm(d)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, d))
        self.blocks = nn.ModuleList(PreLNBlock(d, causal=False) for _ in range(2))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, img):
        x = self.norm(self.patch(img).flatten(2).transpose(1, 2) + self.pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))


@pytest.mark.parametrize("opset", [23, 18])
def test_stream_starting_at_a_layernorm_converts(opset):
    model = export(NormedPatchViT(), torch.randn(2, 3, 9, 9), opset)
    norms = ln_count(model)
    assert norms == 6
    original, converted, outcome = convert_copy(model)
    assert outcome.skipped == [] and ln_count(converted) == 0
    centred = [r for r in outcome.rewrites if r.action == "centre-stream-start"]
    assert len(centred) == 1, outcome.rewrites
    counts = op_counts(converted)
    assert counts["Sub"] == op_counts(model).get("Sub", 0) + 1
    if opset >= 23:
        assert counts["RMSNormalization"] == norms and counts["ReduceMean"] == op_counts(model)["ReduceMean"] + 1
    assert max_rel(original, converted) <= TOLERANCE


def test_hand_made_stream_start_converts_decomposed():
    """onnx.helper graph: embedding -> decomposed LayerNorm -> pre-LN blocks; opset 17."""
    g = Graph(d=7, seed=3)
    model = g.stream_model(style="pow-div", opset=17, embed_norm=True)
    original, converted, outcome = convert_copy(model)
    assert outcome.skipped == []
    assert sum(r.action == "centre-stream-start" for r in outcome.rewrites) == 1
    assert sum(r.action == "to-rms" and r.details["decomposed"] for r in outcome.rewrites) == 4
    assert max_rel(original, converted) <= TOLERANCE


def test_clip_vision_from_transformers_converts():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = CLIPVisionModel(CLIPVisionConfig(image_size=24, patch_size=8, hidden_size=12,
                                                         intermediate_size=20, num_hidden_layers=2,
                                                         num_attention_heads=2))

        def forward(self, pixels):
            return self.clip(pixels).pooler_output  # pre_layrnorm starts the stream

    model = export(Pooled(), torch.randn(2, 3, 24, 24))
    original, converted, outcome = convert_copy(model)
    assert outcome.skipped == [] and ln_count(converted) == 0 and ln_count(original) == 6
    assert any(r.action == "centre-stream-start" for r in outcome.rewrites)
    assert max_rel(original, converted) <= TOLERANCE


# --- refusal reasons: what was found -------------------------------------------------------

def test_post_ln_names_the_norm_and_its_direct_reader():
    model = export(TinyBERT(), TOKENS)
    outcome = assert_refused(model, "post-LN")
    by_node = {s.node: s.reason for s in outcome.skipped}
    ln_emb, ln_1, ln_2 = (n.name for n in model.graph if n.op_type == "LayerNormalization")
    # ln_1 reads ln_emb's output through the residual, and attention reads it directly.
    assert "is written by LayerNormalization" in by_node[ln_1] and f"'{ln_emb}' and read by MatMul" in by_node[ln_1]
    # ln_2's stream comes from ln_1, which itself reads a normalised stream.
    assert f"written by LayerNormalization '{ln_1}', which itself reads the normalised stream" in by_node[ln_2]
    assert by_node[ln_emb].endswith(f"held back: the model is post-LN (see LayerNormalization '{ln_1}')")


def test_stream_start_read_by_a_block_directly_is_post_ln():
    g = Graph(d=6)
    model = g.stream_model(embed_norm=True, embed_probe=True)
    assert_refused(model, "post-LN: stream value 'ln_emb' is written by LayerNormalization 'ln_emb' "
                          "and read by MatMul 'probe' without a LayerNorm")


def test_stream_start_at_another_norm_is_refused_with_its_op():
    g = Graph(d=6)
    model = g.stream_model(embed_norm=True, opset=23, embed_norm_op="RMSNormalization")
    assert_refused(model, "stream value 'ln_emb' is written by RMSNormalization 'ln_emb', a norm this pass "
                          "does not convert")


def test_concat_along_the_hidden_axis_is_named_and_held_back_cites_it():
    """Swin's patch merging: Concat of 2 tokens along the hidden axis, then a LayerNorm."""
    g = Graph(d=4)
    model = g.stream_model(merge_tokens=True)
    outcome = assert_refused(model, "writer 'merge' (Concat) cannot be recentred: it concatenates along the hidden axis")
    held = [s.reason for s in outcome.skipped if "held back" in s.reason]
    assert held and all("(first: LayerNormalization 'ln_merge': writer 'merge' (Concat)" in r for r in held)
