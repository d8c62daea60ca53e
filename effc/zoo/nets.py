"""Torch definitions of the small zoo networks: a pre-norm ViT, a pre-LN GPT and SLAB's RepBN.

Attention is written out as MatMul -> Softmax -> MatMul (not scaled_dot_product_attention) so
the exported ONNX graph shows every matmul to the passes instead of one fused Attention op.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]


class RepBN(nn.Module):
    """SLAB's re-parameterisable BatchNorm for token tensors [B, N, C]: BN(x) + alpha * x.

    At inference it is a per-channel affine, which is what makes it foldable into a linear.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x
        return x.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; optionally causal."""

    def __init__(self, dim: int, heads: int, causal: bool = False, max_len: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.causal = causal
        if causal:
            # True above the diagonal: key positions later than the query are blocked.
            blocked = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
            self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.causal:
            scores = scores.masked_fill(self.blocked[:n, :n], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, norm: NormFactory,
                 causal: bool = False, max_len: int = 0):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = SelfAttention(dim, heads, causal=causal, max_len=max_len)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT: Conv patch embedding, cls token at position 0, learned positions.

    ``norm`` builds every norm layer (per block and final), so the same class serves the
    LayerNorm ViT and the RepBN DeiT. The head reads the cls token after the final norm.
    """

    def __init__(self, image_size: int, patch: int, in_chans: int, classes: int, dim: int,
                 depth: int, heads: int, mlp_hidden: int, norm: NormFactory = nn.LayerNorm):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_hidden, norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class GPT(nn.Module):
    """Pre-LN causal byte-level language model with learned positions and a final LayerNorm.

    The LM head is NOT tied to the token embedding: an untied head keeps the embedding a pure
    writer of the residual stream, which the exact LayerNorm -> RMSNorm rewrite requires.
    """

    def __init__(self, vocab: int = 256, context: int = 128, dim: int = 128, depth: int = 4,
                 heads: int = 4, mlp_hidden: int = 512):
        super().__init__()
        self.context = context
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, dim))
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_hidden, nn.LayerNorm, causal=True, max_len=context)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))
