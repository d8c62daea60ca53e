"""GPT-2 small language model (random init): pre-LN decoder, 124M params, no KV cache, seq 128."""

from __future__ import annotations

from effc.zoo import _hf

DESCRIPTION = "GPT-2 small (124M, random init), pre-LN causal LM, seq 128: input_ids -> logits"
VERSION = 1
SEQ_LEN = 128
VOCAB_SIZE = 50257


def _make_module():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB_SIZE, use_cache=False, attn_implementation=_hf.ATTENTION)
    model = _hf.seeded(lambda: GPT2LMHeadModel(config))
    return _hf.single_output(model, ["input_ids"], "logits")


def sample_inputs(count: int, seed: int):
    return _hf.token_inputs(count, seed, VOCAB_SIZE, SEQ_LEN, with_mask=False)


SPEC = _hf.HFModel(_make_module, sample_inputs, input_names=("input_ids",), output_name="logits")
torch_model, build, evaluate = SPEC.torch_model, SPEC.build, SPEC.evaluate
