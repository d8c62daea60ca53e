"""Train the vit-digits zoo model and write effc/zoo/weights/vit_digits.safetensors.

Deterministic (fixed seeds, one thread by default). The data split and upsampling come from
effc.zoo.vit_digits so training and evaluation read exactly the same images. Training reads only
the train part (1149 images): the validation part is kept unseen for calibration and the accuracy
budget, the test part for the metric.
Augmentation (training only): random affine jitter - shifts up to 3 px of 32, rotations up
to 10 degrees, scale 0.9-1.1 - since 1149 images are too few for a ViT without it.

    python tools/train_vit_digits.py [--epochs 150]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from effc.zoo import vit_digits  # noqa: E402

SEED = 0


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and translation per image (zero fill outside)."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (3 / 16)  # 3 px in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(-1) for chunk in images.split(256)])
    model.train()
    return (predicted == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=vit_digits.WEIGHTS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is reproducible bit for bit and, on a busy 2-core box, faster)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    data = vit_digits.split()
    x_train, y_train = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels)
    x_val, y_val = torch.from_numpy(data.validation_images), torch.from_numpy(data.validation_labels)
    x_test, y_test = torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)

    model = vit_digits.new_module()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total, warmup = args.epochs * steps_per_epoch, 5 * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))

    start = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:4d}  loss {loss.item():.3f}  validation top1 {accuracy(model, x_val, y_val):.4f}"
                  f"  {time.time() - start:.0f}s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"wrote {args.out} (train top1 {accuracy(model, x_train, y_train):.4f}, validation top1 "
          f"{accuracy(model, x_val, y_val):.4f}, test top1 {accuracy(model, x_test, y_test):.4f}, "
          f"{time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
