"""ViT-S/16 image classifier (random init): pre-LN encoder, 224px, 1000 classes, ~22M params."""

from __future__ import annotations

from effc.zoo import _hf

DESCRIPTION = "ViT-S/16 (22M, random init), pre-LN, 224px: pixel_values [1,3,224,224] -> logits [1,1000]"
VERSION = 1
IMAGE_SIZE = 224


def _make_module():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=IMAGE_SIZE, patch_size=16, num_labels=1000, attn_implementation=_hf.ATTENTION)
    model = _hf.seeded(lambda: ViTForImageClassification(config))
    return _hf.single_output(model, ["pixel_values"], "logits")


def sample_inputs(count: int, seed: int):
    return _hf.pixel_inputs(count, seed, IMAGE_SIZE)


SPEC = _hf.HFModel(_make_module, sample_inputs, input_names=("pixel_values",), output_name="logits")
torch_model, build, evaluate = SPEC.torch_model, SPEC.build, SPEC.evaluate
