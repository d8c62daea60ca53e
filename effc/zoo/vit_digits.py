"""vit-digits: a small pre-LN ViT trained on scikit-learn's digits, upsampled to 32x32.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, grey levels 0..16, shipped with
scikit-learn). Fixed split: ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``
gives 1437 training and 360 held-out images. Each image is scaled to [0, 1] and bilinearly
upsampled to 32x32 here, outside the graph, so that patch 4 yields 64 patch tokens.
Weights come from ``tools/train_vit_digits.py``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from effc.zoo._trained import trained_module

DESCRIPTION = "pre-LN ViT (dim 64, 4 layers, 4 heads) trained on sklearn digits at 32x32; metric top-1"
VERSION = 1
WEIGHTS = Path(__file__).parent / "weights" / "vit_digits.safetensors"
CONFIG = dict(image_size=32, patch=4, in_chans=1, classes=10, dim=64, depth=4, heads=4, mlp_hidden=128)
SOURCE_SIZE = 8
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


class Split(NamedTuple):
    """Images [N, 1, 32, 32] float32 in [0, 1] and int64 labels for both halves."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of 1-D bilinear resizing with half-pixel centres and edge clamping
    (the convention of torch's ``interpolate(mode="bilinear", align_corners=False)``)."""
    weights = np.zeros((dst, src))
    for i in range(dst):
        pos = max((i + 0.5) * src / dst - 0.5, 0.0)
        lo = min(int(pos), src - 1)
        hi = min(lo + 1, src - 1)
        frac = pos - lo
        weights[i, lo] += 1.0 - frac
        weights[i, hi] += frac
    return weights


def upsample(images: np.ndarray) -> np.ndarray:
    """Raw digits [N, 8, 8] (0..16) -> [N, 1, 32, 32] float32 in [0, 1]; deterministic numpy."""
    resize = _bilinear_matrix(SOURCE_SIZE, CONFIG["image_size"])
    scaled = np.asarray(images, dtype=np.float64) / 16.0
    big = np.einsum("ij,njk,lk->nil", resize, scaled, resize)
    return np.ascontiguousarray(big[:, None], dtype=np.float32)


@lru_cache(maxsize=1)
def split() -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.reshape(-1, SOURCE_SIZE, SOURCE_SIZE)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=HELD_OUT_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    return Split(upsample(x_train), y_train.astype(np.int64), upsample(x_test), y_test.astype(np.int64))


def new_module():
    """The untrained network (the training script starts from this)."""
    from effc.zoo.nets import ViT

    return ViT(**CONFIG)


def torch_model():
    import torch

    module = trained_module(new_module, WEIGHTS, "tools/train_vit_digits.py")
    return module, (torch.from_numpy(split().test_images[:1]),)


def build():
    from effc.frontend.torch import from_torch

    module, example = torch_model()
    return from_torch(module, example, input_names=["pixel_values"], output_names=["logits"])


def _pick(images: np.ndarray, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rows = np.random.default_rng(seed).choice(len(images), size=count, replace=count > len(images))
    # Copies, so a caller that writes into a feed cannot corrupt the cached split.
    return [{"pixel_values": images[r : r + 1].copy()} for r in rows]


def sample_inputs(count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Held-out images, one per feed."""
    return _pick(split().test_images, count, seed)


def calibration_inputs(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Training images, one per feed (calibration never sees the held-out split)."""
    return _pick(split().train_images, count, seed)


def evaluate(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> tuple[str, float]:
    """Top-1 accuracy over the 360 held-out images, fed one at a time."""
    data = split()
    correct = 0
    for image, label in zip(data.test_images, data.test_labels):
        logits = run({"pixel_values": image[None].copy()})["logits"]
        correct += int(np.argmax(logits.reshape(-1)) == label)
    return "top1", correct / len(data.test_labels)


def budget_metric(feeds: list[dict[str, np.ndarray]], outputs: list[dict], reference: list[dict]) -> float:
    """`--budget 'metric<=X%'`: the fraction of held-out calibration images whose top-1 class differs
    from the float model's. Calibration images carry no labels; a changed prediction is the most a
    conversion can cost the top-1 accuracy on them, so this bounds the accuracy change from above."""
    changed = sum(int(np.argmax(o["logits"]) != np.argmax(r["logits"])) for o, r in zip(outputs, reference))
    return changed / max(len(reference), 1)
