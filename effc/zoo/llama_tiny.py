"""A tiny Llama (random init): RMSNorm, SwiGLU, RoPE, grouped-query attention, seq 128."""

from __future__ import annotations

from effc.zoo import _hf

DESCRIPTION = "Llama tiny (hidden 256, 4 layers, 4 heads / 2 kv, random init), seq 128: input_ids -> logits"
VERSION = 1
SEQ_LEN = 128
VOCAB_SIZE = 32000


def _make_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         use_cache=False, attn_implementation=_hf.ATTENTION)
    model = _hf.seeded(lambda: LlamaForCausalLM(config))
    return _hf.single_output(model, ["input_ids"], "logits")


def sample_inputs(count: int, seed: int):
    return _hf.token_inputs(count, seed, VOCAB_SIZE, SEQ_LEN, with_mask=False)


SPEC = _hf.HFModel(_make_module, sample_inputs, input_names=("input_ids",), output_name="logits")
torch_model, build, evaluate = SPEC.torch_model, SPEC.build, SPEC.evaluate
