"""BERT-base encoder (random init): post-LN, 12 layers, hidden 768, seq 128, no pooler."""

from __future__ import annotations

from effc.zoo import _hf

DESCRIPTION = "BERT-base (110M, random init), post-LN, seq 128: input_ids, attention_mask -> last_hidden_state"
VERSION = 1
SEQ_LEN = 128
VOCAB_SIZE = 30522


def _make_module():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, attn_implementation=_hf.ATTENTION)
    # The pooler (tanh of the [CLS] row) is a task head, not part of the encoder being compiled.
    model = _hf.seeded(lambda: BertModel(config, add_pooling_layer=False))
    return _hf.single_output(model, ["input_ids", "attention_mask"], "last_hidden_state")


def sample_inputs(count: int, seed: int):
    return _hf.token_inputs(count, seed, VOCAB_SIZE, SEQ_LEN, with_mask=True)


SPEC = _hf.HFModel(_make_module, sample_inputs, input_names=("input_ids", "attention_mask"),
                   output_name="last_hidden_state")
torch_model, build, evaluate = SPEC.torch_model, SPEC.build, SPEC.evaluate
