"""deit-tiny-repbn: a DeiT-Tiny-shaped pre-norm ViT whose norms are all SLAB's RepBN.

Shape: 224px, patch 16 (196 tokens + cls), dim 192, 12 blocks, 3 heads, MLP 768, 1000 classes;
the head reads ``x[:, 0]`` after the final RepBN. Weights are random under
``torch.manual_seed(0)``, and every RepBN gets uniform random running statistics, affine
parameters and alpha, so that a BatchNorm-folding pass meets non-trivial values everywhere.
Each RepBN exports as Transpose -> BatchNormalization (+ alpha * x) -> Transpose.
There is no task; the metric is agreement with the torch module.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np

DESCRIPTION = "DeiT-Tiny-shaped ViT with SLAB RepBN norms (random weights, random BN stats); metric output-cosine"
VERSION = 1
CONFIG = dict(image_size=224, patch=16, in_chans=3, classes=1000, dim=192, depth=12, heads=3, mlp_hidden=768)
SEED = 0
REFERENCE_COUNT, REFERENCE_SEED = 4, 1234


def _randomise_norms(module) -> None:
    """Move every RepBN away from its identity-like init (mean 0, var 1, gamma 1, beta 0, alpha 1)."""
    import torch

    from effc.zoo.nets import RepBN

    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, RepBN):
                norm.bn.running_mean.uniform_(-0.5, 0.5)
                norm.bn.running_var.uniform_(0.5, 2.0)
                norm.bn.weight.uniform_(0.5, 1.5)
                norm.bn.bias.uniform_(-0.2, 0.2)
                norm.alpha.uniform_(0.5, 1.5)


def torch_model():
    import torch

    from effc.zoo.nets import RepBN, ViT

    # A private RNG stream, so building the model never disturbs the caller's torch seed.
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        module = ViT(**CONFIG, norm=RepBN)
        _randomise_norms(module)
        example = torch.randn(1, 3, CONFIG["image_size"], CONFIG["image_size"])
    return module.eval(), (example,)


def build():
    from effc.frontend.torch import from_torch

    module, example = torch_model()
    return from_torch(module, example, input_names=["pixel_values"], output_names=["logits"])


def sample_inputs(count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Standard-normal images [1, 3, 224, 224] (the range of ImageNet-normalised pixels)."""
    rng = np.random.default_rng(seed)
    size = CONFIG["image_size"]
    return [{"pixel_values": rng.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(count)]


@lru_cache(maxsize=1)
def reference_logits() -> tuple[np.ndarray, ...]:
    """The torch module's logits on sample_inputs(4, seed=1234), computed once per process."""
    import torch

    module, _ = torch_model()
    with torch.no_grad():
        return tuple(module(torch.from_numpy(feed["pixel_values"])).numpy()
                     for feed in sample_inputs(REFERENCE_COUNT, REFERENCE_SEED))


def evaluate(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> tuple[str, float]:
    """Mean cosine similarity between ``run``'s logits and the torch module's."""
    cosines = []
    for feed, ref in zip(sample_inputs(REFERENCE_COUNT, REFERENCE_SEED), reference_logits()):
        got = run(feed)["logits"].astype(np.float64).ravel()
        want = ref.astype(np.float64).ravel()
        denom = float(np.linalg.norm(got) * np.linalg.norm(want))
        cosines.append(float(got @ want) / denom if denom > 0 else 0.0)  # all-zero output: no agreement
    return "output-cosine", float(np.mean(cosines))
