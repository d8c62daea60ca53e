"""Acceptance figures of issue 16 (accuracy side): prune-tokens on vit-digits and minilm-l6.

    python tools/prune_accuracy.py [--keeps 0.9,0.8,0.7,0.65,0.6,0.5] [--threads 1] [-o part.md]

- vit-digits: held-out top-1 (360 images) of the unpruned model and of each method at each FLOP
  keep ratio (the pass's ``keep``; the FLOPs actually kept, counted by effc.stats, beside it).
- minilm-l6 with its attention mask at 30% fewer tokens (``keep`` 0.7; its blocks are linear-bound,
  so FLOPs and tokens fall alike): mean embedding cosine to the unpruned model per method on
  (a) the 64 shipped sentences, padded to 64 tokens, and (b) dense inputs, pairs of shipped
  sentences joined so that nearly all 64 positions are real tokens; and the largest difference,
  on the shipped sentences, between the pruned model and the torch model run on the unpadded
  sentence (padding must be pruned first, so this is exact).
All runs are ONNX Runtime on the pruned ONNX file, one feed at a time.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from effc import zoo
from effc.frontend.onnx import load
from effc.ir import copy_model
from effc.passes.base import PassContext
from effc.passes.cleanup import cleanup
from effc.passes.prune_tokens import METHODS, PruneTokens
from effc.stats import flops
from effc.verify import OrtRunner
from effc.zoo.cache import cached_model_path


def pruned(base, method: str, keep: float):
    model = copy_model(base)
    outcome = PruneTokens().run(model, PassContext(options={"method": method, "keep": keep}))
    if not outcome.changed:
        raise SystemExit(f"prune-tokens refused: {outcome.skipped[0].reason if outcome.skipped else '?'}")
    cleanup(model)
    schedule = next(r for r in outcome.rewrites if r.action == "schedule")
    return model, schedule.details["tokens"]


def model_flops(model, feed) -> float:
    return float(flops(model, {k: list(v.shape) for k, v in feed.items()}))


def vit_digits(keeps: list[float], threads: int) -> list[str]:
    module = zoo.get("vit-digits")
    base = load(cached_model_path("vit-digits"))
    feed = module.sample_inputs(1, 0)[0]
    base_flops = model_flops(base, feed)
    _, top1 = module.evaluate(OrtRunner(base, threads=threads))
    lines = ["### vit-digits: held-out top-1 (360 images) against the FLOP keep ratio", "",
             f"Unpruned: top-1 {100 * top1:.2f}% at {base_flops / 1e6:.2f} MFLOPs.", "",
             "| keep (target) | FLOPs kept | tokens per block | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for keep in keeps:
        cells, tokens, kept = [], None, None
        for method in METHODS:
            model, tokens_m = pruned(base, method, keep)
            _, acc = module.evaluate(OrtRunner(model, threads=threads))
            if method == "zero-tprune":
                tokens, kept = tokens_m, model_flops(model, feed) / base_flops
            own = "" if tokens is None or tokens_m == tokens else f" [{','.join(map(str, tokens_m))}]"
            cells.append(f"{100 * acc:.2f} ({100 * (acc - top1):+.2f}){own}")
            print(f"vit-digits keep {keep} {method}: {acc:.4f} tokens {tokens_m}", file=sys.stderr)
        lines.append(f"| {keep:g} | {kept:.3f} | {','.join(map(str, tokens))} | " + " | ".join(cells) + " |")
    return lines + ["", "Cells: top-1 % (change in points). Tokens per block and FLOPs kept (whole model, "
                        "effc.stats) are zero-tprune's; top-k uses the same schedule; ToMe merges at most half "
                        "of the unprotected tokens at once, so where it stops short its own tokens per block "
                        "follow in brackets (it then keeps more FLOPs than the target)."]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def minilm(threads: int, keep: float = 0.7) -> list[str]:
    import torch

    module = zoo.get("minilm-l6")
    base = load(cached_model_path("minilm-l6"))
    sentences = module.sentences()
    padded = module.encode(sentences)
    joined = [" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)]
    dense = module.encode(joined)
    real = np.mean([f["attention_mask"].sum() for f in padded])
    real_dense = np.mean([f["attention_mask"].sum() for f in dense])
    reference = OrtRunner(base, threads=threads)
    ref_padded = [reference(f)["embedding"] for f in padded]
    ref_dense = [reference(f)["embedding"] for f in dense]
    torch_module = module.SPEC.make_module()
    lines = [f"### minilm-l6 with its attention mask at keep {keep} (30% fewer block FLOPs / tokens)", "",
             f"Shipped sentences: {len(padded)}, {real:.1f} real tokens of 64 on average; dense inputs: "
             f"{len(dense)} joins of 4 sentences, {real_dense:.1f} real tokens of 64.", "",
             "| method | tokens per block | cosine, shipped (padded) | cosine, dense | min cosine, dense | "
             "max abs diff to torch on the unpadded sentence |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        model, tokens = pruned(base, method, keep)
        run = OrtRunner(model, threads=threads)
        out_padded = [run(f)["embedding"] for f in padded]
        out_dense = [run(f)["embedding"] for f in dense]
        worst = 0.0
        with torch.inference_mode():
            for feed, got in zip(padded, out_padded):
                length = int(feed["attention_mask"].sum())
                ids = torch.from_numpy(feed["input_ids"][:, :length])
                want = torch_module(ids, torch.ones_like(ids)).numpy()
                worst = max(worst, float(np.abs(got - want).max()))
        cos_p = np.mean([_cos(a, b) for a, b in zip(out_padded, ref_padded)])
        cos_d = [_cos(a, b) for a, b in zip(out_dense, ref_dense)]
        lines.append(f"| {method} | {','.join(map(str, tokens))} | {cos_p:.6f} | {np.mean(cos_d):.4f} | "
                     f"{np.min(cos_d):.4f} | {worst:.2e} |")
        print(f"minilm {method}: {lines[-1]}", file=sys.stderr)
    return lines


def compiled_vs_ort(out: str, threads: int) -> list[str]:
    """A minilm-l6 OUT compiled with prune-tokens: its module against ONNX Runtime on OUT/model.onnx,
    on the shipped (padded) sentences and the dense joins (scale-relative, effc.verify.deviation)."""
    from pathlib import Path

    from effc.codegen.runtime import load_compiled
    from effc.verify import deviation

    module = zoo.get("minilm-l6")
    sentences = module.sentences()
    feeds = {"shipped": module.encode(sentences),
             "dense": module.encode([" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)])}
    compiled = load_compiled(Path(out), threads)
    ort = OrtRunner(Path(out) / "model.onnx", threads=threads)
    lines = [f"Compiled module ({out}) against ONNX Runtime on the same pruned ONNX:", ""]
    for name, group in feeds.items():
        err = deviation([compiled(f) for f in group], ort.run_all(group))
        lines.append(f"- {name} ({len(group)} inputs): max rel {err.max_rel:.2e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", default="0.9,0.8,0.7,0.65,0.6,0.5,0.4,0.3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--compiled", default=None, help="a minilm-l6 OUT compiled with prune-tokens: check it "
                        "against ONNX Runtime on its model.onnx")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    lines = vit_digits([float(k) for k in args.keeps.split(",")], args.threads) if args.keeps else []
    if not args.skip_minilm:
        lines += [""] + minilm(args.threads)
    if args.compiled:
        lines += [""] + compiled_vs_ort(args.compiled, args.threads)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
