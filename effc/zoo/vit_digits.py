"""vit-digits: a small pre-LN ViT trained on scikit-learn's digits, upsampled to 32x32.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, grey levels 0..16, shipped with
scikit-learn). Fixed, stratified splits (``train_test_split(..., stratify=labels, random_state=0)``):
360 test images (20%), whose top-1 is the metric, and of the other 1437 a 20% validation part
(288 images) that training never sees, leaving 1149 to train on. Each image is scaled to [0, 1]
and bilinearly upsampled to 32x32 here, outside the graph, so that patch 4 yields 64 patch tokens.
Weights come from ``tools/train_vit_digits.py``.

Calibration draws from the validation images. They must be unseen by training: the budget
(``--budget 'metric<=X%'``) is measured on the held-out part of the calibration set, and a model
predicts its own training images so robustly that a budget measured there admits conversions
which then cost points on the test split (lookup linears: 2.2-2.5 points of top-1 under a 1%
budget). They must also be disjoint from the test split, so the metric stays held out.

The budget's metric counts changed top-1 predictions, a :class:`effc.budget.Rate`: the budget
compares its upper confidence bound, not the point estimate, with the bound. A 1% bound then
needs more held-out images than the default quarter of the 288 (72): ``--budget-holdout 0.75``
holds out 216 and leaves 72 (4680 patch rows, more than the 4096 the lookup pass samples) to fit on.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from effc.budget import Rate
from effc.errors import EffcError
from effc.zoo._trained import trained_module

DESCRIPTION = "pre-LN ViT (dim 64, 4 layers, 4 heads) trained on sklearn digits at 32x32; metric top-1"
VERSION = 2  # 2: a validation split for calibration; retrained without it
WEIGHTS = Path(__file__).parent / "weights" / "vit_digits.safetensors"
CONFIG = dict(image_size=32, patch=4, in_chans=1, classes=10, dim=64, depth=4, heads=4, mlp_hidden=128)
SOURCE_SIZE = 8
HELD_OUT_FRACTION = 0.2
VALIDATION_FRACTION = 0.2  # of the non-test images
SPLIT_SEED = 0
BUDGET_METRIC_COUNTS = "changed top-1 predictions"  # budget_metric returns a Rate of these


class Split(NamedTuple):
    """Images [N, 1, 32, 32] float32 in [0, 1] and int64 labels of the three disjoint parts."""

    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
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
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, digits.target, test_size=HELD_OUT_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=VALIDATION_FRACTION, stratify=y_rest, random_state=SPLIT_SEED)
    return Split(upsample(x_train), y_train.astype(np.int64), upsample(x_val), y_val.astype(np.int64),
                 upsample(x_test), y_test.astype(np.int64))


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


def _pick(images: np.ndarray, count: int, seed: int, replace: bool) -> list[dict[str, np.ndarray]]:
    rows = np.random.default_rng(seed).choice(len(images), size=count, replace=replace)
    # Copies, so a caller that writes into a feed cannot corrupt the cached split.
    return [{"pixel_values": images[r : r + 1].copy()} for r in rows]


def sample_inputs(count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Test images, one per feed (repeated when ``count`` exceeds the 360: these only feed runs)."""
    return _pick(split().test_images, count, seed, replace=count > len(split().test_images))


def calibration_inputs(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Distinct validation images, one per feed: unseen by training and disjoint from the test split
    (see the module docstring). No repeats: a repeated image could land both in the part a pass fits
    on and in the budget's held-out quarter, so ``count`` above the pool is refused."""
    pool = split().validation_images
    if count > len(pool):
        raise EffcError(f"vit-digits has {len(pool)} validation images to calibrate on; asked for {count}")
    return _pick(pool, count, seed, replace=False)


def evaluate(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> tuple[str, float]:
    """Top-1 accuracy over the 360 held-out images, fed one at a time."""
    data = split()
    correct = 0
    for image, label in zip(data.test_images, data.test_labels):
        logits = run({"pixel_values": image[None].copy()})["logits"]
        correct += int(np.argmax(logits.reshape(-1)) == label)
    return "top1", correct / len(data.test_labels)


def budget_metric(feeds: list[dict[str, np.ndarray]], outputs: list[dict], reference: list[dict]) -> Rate:
    """`--budget 'metric<=X%'`: how many held-out calibration images' top-1 class differs from the
    float model's, of how many. Calibration images carry no labels; a changed prediction is the
    most a conversion can cost the top-1 accuracy on them, so the rate bounds the accuracy change
    from above, and the budget reads it by its upper confidence bound (a count over a few hundred
    images is coarse). The bound only carries over to the test split because these are validation
    images, as unseen by training as the test images: on training images the model is robust to
    conversions that flip unseen ones."""
    changed = sum(int(np.argmax(o["logits"]) != np.argmax(r["logits"])) for o, r in zip(outputs, reference))
    return Rate(changed, len(reference))
