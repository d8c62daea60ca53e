"""Small random-init `transformers` architectures for the generality suite.

Each builder takes (attention implementation, batch) and returns (torch module taking positional
tensors and returning one tensor, example inputs as a dict name -> numpy array). Configs are small
(2 layers, hidden 32-64) and sequence lengths / image sizes are not powers of two, so that tiling
remainders are exercised. torch and transformers are imported inside the builders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ = 11  # tokens of the language models
VOCAB = 97


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[str, int], tuple[Any, dict[str, np.ndarray]]]
    sdpa: bool  # transformers offers sdpa attention for it (exported with sdpa, its default, and eager)
    # where its norms sit, for layernorm-to-rmsnorm: "pre-ln", "post-ln", "stem-ln" (pre-LN whose
    # residual stream starts at a LayerNorm: a patch-embedding or stem norm), "rms" (RMSNorm already)
    # or "none"
    norms: str


def _wrap(model, input_names: tuple[str, ...], field: str):
    import torch

    class Single(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(input_names, inputs)))[field]

    return Single().eval()


def _seeded(cls, config, attn: str):
    import torch

    torch.manual_seed(0)
    if attn is not None:  # convolutional models refuse any attention implementation
        config._attn_implementation = attn
    model = cls(config).eval()
    _randomise_norms(model)
    return model


def _randomise_norms(model) -> None:
    """Random BatchNorm statistics and norm affines: with the init's zeros and ones a fold or a
    norm rewrite that mishandles them would still look right."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            for name in ("weight", "bias"):
                p = getattr(mod, name, None)
                if ("Norm" in type(mod).__name__ and isinstance(p, torch.nn.Parameter) and p.dim() == 1):
                    base = 1.0 if name == "weight" else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def _rng(batch: int) -> np.random.Generator:
    return np.random.default_rng(100 + batch)


def _tokens(batch: int, mask: bool) -> dict[str, np.ndarray]:
    rng = _rng(batch)
    feed = {"input_ids": rng.integers(1, VOCAB, size=(batch, SEQ), dtype=np.int64)}
    if mask:
        m = np.ones((batch, SEQ), dtype=np.int64)
        m[-1, SEQ - 3:] = 0  # the last sequence is padded: the mask must reach the attention
        feed["attention_mask"] = m
    return feed


def _pixels(batch: int, size: int, channels: int = 3) -> dict[str, np.ndarray]:
    return {"pixel_values": _rng(batch).standard_normal((batch, channels, size, size)).astype(np.float32)}


def _text(cls, config, attn, batch, mask, field="last_hidden_state"):
    model = _seeded(cls, config, attn)
    feed = _tokens(batch, mask)
    return _wrap(model, tuple(feed), field), feed


def _image(cls, config, attn, batch, size, field="last_hidden_state"):
    model = _seeded(cls, config, attn)
    feed = _pixels(batch, size)
    return _wrap(model, ("pixel_values",), field), feed


# ---- builders ------------------------------------------------------------------------------------

def vit(attn, batch):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=30, patch_size=6, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=96, add_pooling_layer=False)
    return _image(ViTModel, cfg, attn, batch, 30)


def deit(attn, batch):
    from transformers import DeiTConfig, DeiTModel

    cfg = DeiTConfig(image_size=30, patch_size=6, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=96)
    model = _seeded(lambda c: DeiTModel(c, add_pooling_layer=False), cfg, attn)
    feed = _pixels(batch, 30)
    return _wrap(model, ("pixel_values",), "last_hidden_state"), feed


def bert(attn, batch):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=96, max_position_embeddings=32)
    model = _seeded(lambda c: BertModel(c, add_pooling_layer=False), cfg, attn)
    feed = _tokens(batch, mask=True)
    return _wrap(model, tuple(feed), "last_hidden_state"), feed


def distilbert(attn, batch):
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=3, hidden_dim=96,
                           max_position_embeddings=32)
    return _text(DistilBertModel, cfg, attn, batch, mask=True)


def gpt2(attn, batch):
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=3, n_positions=32)
    return _text(GPT2Model, cfg, attn, batch, mask=False)


def llama(attn, batch):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=3, intermediate_size=80, max_position_embeddings=32)
    return _text(LlamaModel, cfg, attn, batch, mask=False)


def qwen2(attn, batch):
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=80, max_position_embeddings=32)
    return _text(Qwen2Model, cfg, attn, batch, mask=False)


def swin(attn, batch):
    from transformers import SwinConfig, SwinModel

    # 56/4 = 14x14 patches in windows of 7: 4 windows per image (batched linears on 4-D tensors)
    cfg = SwinConfig(image_size=56, patch_size=4, embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=7,
                     mlp_ratio=2.0)
    model = _seeded(lambda c: SwinModel(c, add_pooling_layer=False), cfg, attn)
    feed = _pixels(batch, 56)
    return _wrap(model, ("pixel_values",), "last_hidden_state"), feed


def convnext(attn, batch):
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(num_channels=3, patch_size=4, hidden_sizes=[24, 48], depths=[1, 1], num_stages=2,
                         image_size=44)
    return _image(ConvNextModel, cfg, attn, batch, 44)


def levit(attn, batch):
    from transformers import LevitConfig, LevitModel

    # the patch embedding halves 4 times: 80 -> 5x5 tokens; one subsampling attention to 3x3
    cfg = LevitConfig(image_size=80, hidden_sizes=[32, 48], num_attention_heads=[2, 3], depths=[1, 1],
                      key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2],
                      down_ops=[["Subsample", 8, 2, 4, 2, 2]])
    return _image(LevitModel, cfg, attn, batch, 80)


def whisper_encoder(attn, batch):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=20, d_model=48, encoder_layers=2, encoder_attention_heads=3,
                        encoder_ffn_dim=96, max_source_positions=25, decoder_layers=1)
    model = _seeded(WhisperEncoder, cfg, attn)
    feed = {"input_features": _rng(batch).standard_normal((batch, 20, 50)).astype(np.float32)}
    return _wrap(model, ("input_features",), "last_hidden_state"), feed


def resnet(attn, batch):
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return _image(ResNetModel, cfg, attn, batch, 44)


def clip_vision(attn, batch):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=96)
    return _image(CLIPVisionModel, cfg, attn, batch, 30)


def t5_encoder(attn, batch):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=48, d_kv=16, d_ff=96, num_layers=2, num_heads=3,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return _text(T5EncoderModel, cfg, attn, batch, mask=True)


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in (
    Arch("vit", vit, True, "pre-ln"),
    Arch("deit", deit, True, "pre-ln"),
    Arch("bert", bert, True, "post-ln"),
    Arch("distilbert", distilbert, True, "post-ln"),
    Arch("gpt2", gpt2, True, "pre-ln"),
    Arch("llama", llama, True, "rms"),
    Arch("qwen2", qwen2, True, "rms"),
    Arch("swin", swin, True, "stem-ln"),
    Arch("convnext", convnext, False, "stem-ln"),
    Arch("levit", levit, False, "none"),
    Arch("whisper-encoder", whisper_encoder, True, "pre-ln"),
    Arch("resnet", resnet, False, "none"),
    Arch("clip-vision", clip_vision, True, "stem-ln"),
    Arch("t5-encoder", t5_encoder, True, "rms"),
)}


def build(name: str, attn: str, batch: int):
    """(module, example feed) of architecture ``name`` with attention ``attn`` ("sdpa" or "eager")."""
    return ARCHITECTURES[name].build(attn, batch)
