"""prune-tokens: the block analysis on HF exports, refusals, and each method's output in ONNX Runtime
(token counts, CLS kept, order kept, padding pruned first and then exactly harmless)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from effc.frontend.onnx import load
from effc.ir import copy_model, to_proto
from effc.passes import get_pass
from effc.passes._token_blocks import NotAnEncoder, find_encoder
from effc.passes._token_schedule import block_flops, from_list, from_target
from effc.passes.base import PassContext
from effc.passes.cleanup import cleanup
from effc.passes.prune_tokens import METHODS
from effc.verify import OrtRunner
from tests.helpers import tiny_mlp_proto

BATCH = 2  # the generality exports are static; batch 2 checks per-row selection


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random-init HF models exported by torch's dynamo exporter (eager attention; sdpa at opset
    23 is the fused Attention op), with their feeds."""
    from tests.generality.export import export

    root = tmp_path_factory.mktemp("prune_tokens")
    out = {}
    for name, attn in (("vit", "eager"), ("bert", "eager"), ("gpt2", "eager"), ("vit", "sdpa")):
        path, feed, _ = export(name, attn, BATCH, root / f"{name}_{attn}.onnx")
        out[f"{name}_{attn}"] = (path, feed)
    return out


def _prune(path, **options):
    model = load(path)
    outcome = get_pass("prune-tokens").run(model, PassContext(options=options))
    return model, outcome


def _with_positions(model: ir.Model) -> list[str]:
    """Expose each reduction's kept original positions as graph outputs; returns their names."""
    names = []
    for node in model.graph:
        for out in node.outputs:
            if out.name.endswith("/positions"):
                model.graph.outputs.append(out)
                names.append(out.name)
    return names


def test_finds_the_blocks_of_a_pre_ln_vit(exports):
    enc = find_encoder(load(exports["vit_eager"][0]).graph)
    assert (len(enc.blocks), enc.batch, enc.tokens, enc.hidden, enc.norm) == (2, BATCH, 26, 48, "pre-LN")
    assert enc.mask_bias is None
    for block in enc.blocks:
        assert block.softmax.op_type == "Softmax" and list(block.probs.shape) == [BATCH, 3, 26, 26]
        assert list(block.keys.shape) == [BATCH, 3, 16, 26]
        assert block.stream.producer().op_type in ("Add", "Concat")  # the residual stream, not its norm


def test_finds_the_blocks_and_mask_of_a_post_ln_bert(exports):
    enc = find_encoder(load(exports["bert_eager"][0]).graph)
    assert (len(enc.blocks), enc.tokens, enc.norm) == (2, 11, "post-LN")
    assert enc.mask_bias is not None and list(enc.mask_bias.shape)[-1] == 11
    assert all(b.stream.producer().op_type == "LayerNormalization" for b in enc.blocks)


@pytest.mark.parametrize("case, reason", [
    ("gpt2_eager", "differs between query rows"),
    ("vit_sdpa", "fused Attention op"),
    ("mlp", "no recognisable attention"),
])
def test_refuses_with_a_reason_and_leaves_the_model_unchanged(exports, tmp_path, case, reason):
    if case == "mlp":
        path = tmp_path / "mlp.onnx"
        path.write_bytes(tiny_mlp_proto(opset=18).SerializeToString())
    else:
        path = exports[case][0]
    model = load(path)
    before = to_proto(model).SerializeToString()
    outcome = get_pass("prune-tokens").run(model, PassContext(options={"method": "tome"}))
    assert not outcome.changed
    assert len(outcome.skipped) == 1 and reason in outcome.skipped[0].reason
    assert "\n" not in outcome.skipped[0].reason
    assert to_proto(model).SerializeToString() == before
    with pytest.raises(NotAnEncoder, match=reason):
        find_encoder(load(path).graph)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_in_ort_with_the_scheduled_counts_cls_and_order_kept(exports, method):
    path, feed = exports["vit_eager"]
    model, outcome = _prune(path, method=method, schedule="1,0.62")  # 26 -> 16 tokens
    assert [r.details["tokens_after"] for r in outcome.rewrites if r.action in ("prune", "merge")] == [16]
    cleanup(model)
    names = _with_positions(model)
    got = OrtRunner(model).run_all([feed])[0]
    assert got["output"].shape == (BATCH, 16, 48)
    positions = got[names[0]]
    assert positions.shape == (BATCH, 16) and np.all(positions[:, 0] == 0)  # CLS kept
    assert np.all(np.diff(positions, axis=1) > 0)  # order kept, no token twice
    if method == "tome":  # ToMe removes only even (a) tokens
        gone = [sorted(set(range(26)) - set(row.tolist())) for row in positions]
        assert all(t % 2 == 0 for row in gone for t in row)


@pytest.mark.parametrize("method", METHODS)
def test_padding_goes_first_and_then_changes_nothing(exports, method):
    """BERT's last row has 3 padding tokens: removing 3 tokens removes exactly those, and the real
    tokens' outputs equal the unpruned model's (padding never reaches a real token)."""
    path, feed = exports["bert_eager"]
    assert feed["attention_mask"][-1].tolist()[-3:] == [0, 0, 0]
    model, outcome = _prune(path, method=method, schedule="11,8")
    assert outcome.changed
    cleanup(model)
    names = _with_positions(model)
    got = OrtRunner(model).run_all([feed])[0]
    want = OrtRunner(load(path)).run_all([feed])[0]["output"]
    positions = got[names[0]]
    assert positions[-1].tolist() == list(range(8))
    np.testing.assert_allclose(got["output"][-1], want[-1, :8], rtol=1e-4, atol=1e-4)
    assert np.all(positions[:, 0] == 0) and np.all(np.diff(positions, axis=1) > 0)


def test_keep_target_meets_the_flop_fraction():
    per_token, hidden = 2 * (4 * 384 * 384 + 2 * 384 * 1536), 384
    for keep in (0.9, 0.65, 0.5):
        counts = from_target(197, 12, keep, per_token, hidden, protect=1, halve=False)
        ratio = sum(block_flops(n, per_token, hidden) for n in counts) / (12 * block_flops(197, per_token, hidden))
        assert counts[0] == 197 and all(a >= b for a, b in zip(counts, counts[1:]))
        assert keep - 0.05 < ratio <= keep


def test_schedule_list_is_checked():
    assert from_list("1,0.5,13", 26, 3, protect=1, halve=False) == [26, 13, 13]
    from effc.errors import EffcError
    with pytest.raises(EffcError, match="block 0 must keep"):
        from_list("0.9,0.5", 26, 2, protect=1, halve=False)
    with pytest.raises(EffcError, match="at most half"):
        from_list("1,0.3", 26, 2, protect=1, halve=True)
    with pytest.raises(EffcError, match="2 blocks"):
        from_list("1,0.5,0.4", 26, 2, protect=1, halve=False)


def test_pruned_model_is_unchanged_by_a_copy_roundtrip(exports):
    """The rewritten graph serialises and reloads (names unique, shapes inferred)."""
    model, _ = _prune(exports["vit_eager"][0], method="zero-tprune", keep=0.7)
    cleanup(model)
    again = copy_model(model)
    assert [list(o.shape) for o in again.graph.outputs] == [list(o.shape) for o in model.graph.outputs]
    assert all(o.shape is not None for o in again.graph.outputs)
