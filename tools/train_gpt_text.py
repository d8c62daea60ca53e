"""Train the gpt-text zoo model and write effc/zoo/weights/gpt_text.safetensors.

Deterministic (fixed seeds, one thread by default, a fixed number of steps). The corpus split
comes from effc.zoo.gpt_text: training batches are random 129-byte windows of the training
files of this interpreter's stdlib. On first run (or with --refreeze) it also freezes the
held-out evaluation windows into effc/zoo/data/gpt_text_heldout.npz; otherwise the shipped
windows are kept, so retraining on another Python version does not move the metric.

    python tools/train_gpt_text.py [--steps 2400]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from effc.zoo import gpt_text  # noqa: E402

SEED = 0


def freeze_held_out(path: Path) -> None:
    windows = gpt_text.extract_held_out_windows()
    files = [f for f in gpt_text.stdlib_files() if gpt_text.is_held_out(f)]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, windows=windows, files=np.array(files), python=np.array(sys.version.split()[0]))
    print(f"froze {len(windows)} held-out windows from {len(files)} files into {path}")


def lr_factor(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay from 1 to 0.1 of the peak learning rate."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def held_out_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(windows)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    model.train()
    return math.exp(nll.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=gpt_text.WEIGHTS)
    parser.add_argument("--refreeze", action="store_true", help="rewrite the held-out windows from this stdlib")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is reproducible bit for bit and, on a busy 2-core box, faster)")
    args = parser.parse_args()

    if args.refreeze or not gpt_text.HELD_OUT.exists():
        freeze_held_out(gpt_text.HELD_OUT)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    stream = torch.from_numpy(gpt_text.training_stream().astype(np.int64))
    held_out = torch.from_numpy(gpt_text.held_out_windows())
    span = gpt_text.CONTEXT + 1
    print(f"training bytes {len(stream):,}, held-out windows {len(held_out)}")

    model = gpt_text.new_module()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))

    start = time.time()
    offsets = torch.arange(span)
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(stream) - span, (args.batch,), generator=gen)
        chunk = stream[starts[:, None] + offsets]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            ppl = held_out_perplexity(model, held_out)
            print(f"step {step:5d}  train nll {loss.item():.3f}  held-out ppl {ppl:.3f}  {time.time() - start:.0f}s",
                  flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    ppl = held_out_perplexity(model, held_out)
    print(f"wrote {args.out} (held-out perplexity {ppl:.3f}, {time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
