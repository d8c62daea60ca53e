"""A transformers model exported with fused attention (sdpa: the ONNX Attention op) and with eager
attention (MatMul/Softmax), both compiled by effc for llvm, timed side by side in one process.

    python tools/bench_attention_export.py [--model vit|bert] [--layers 4] [--batch 1] [--runs 15]

Random init, small configs (ViT: hidden 192, 3 heads, 224px -> 197 tokens; BERT: hidden 256,
4 heads, seq 128 with a padding mask whose last quarter is padding). Both builds are checked against
ONNX Runtime on their own export, and against each other; the timing loop is effc's `bench`
interleaving (effc.codegen.bench.turns: each engine idles, then is timed, in turn; warm-up rounds
dropped). Prints one table and the ratio sdpa/eager of the steady-state medians.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = 1e-4  # scale-relative agreement with ONNX Runtime, as effc's tests hold compiled modules to


def make_module(kind: str, attention: str, layers: int):
    from effc.zoo import _hf

    if kind == "vit":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=192, num_hidden_layers=layers, num_attention_heads=3, intermediate_size=768,
                           image_size=224, patch_size=16, attn_implementation=attention)
        model = _hf.seeded(lambda: ViTModel(config, add_pooling_layer=False))
        return _hf.single_output(model, ["pixel_values"], "last_hidden_state"), ["pixel_values"]
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=1024, attn_implementation=attention)
    model = _hf.seeded(lambda: BertModel(config, add_pooling_layer=False))
    names = ["input_ids", "attention_mask"]
    return _hf.single_output(model, names, "last_hidden_state"), names


def sample_feed(kind: str, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
    mask = np.ones((batch, 128), np.int64)
    mask[:, 96:] = 0  # padding: the mask matters
    return {"input_ids": rng.integers(0, 1000, size=(batch, 128)).astype(np.int64), "attention_mask": mask}


def build(kind: str, attention: str, layers: int, feed: dict, work: Path):
    """(compiled module, ONNX op counts, max_rel against ONNX Runtime) of one export."""
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled
    from effc.frontend.torch import from_torch
    from effc.verify import OrtRunner, deviation
    from effc.zoo._hf import to_tensors

    module, names = make_module(kind, attention, layers)
    model = from_torch(module, to_tensors(feed, names), opset=23, input_names=names)
    ops = [n.op_type for n in model.graph]
    out = work / attention
    result = compile_model(model, "llvm", out)
    compiled = load_compiled(out)
    err = deviation([compiled(feed)], [OrtRunner(model)(feed)]).max_rel
    return compiled, {"Attention": ops.count("Attention"), "Softmax": ops.count("Softmax"),
                      "MatMul": ops.count("MatMul")}, err, result.rule_hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit", "bert"], default="vit")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from effc.codegen.bench import _effc_runner, _stats, turns
    from effc.codegen.runtime import configure_threads
    from effc.verify import deviation

    feed = sample_feed(args.model, args.batch)
    engines, outputs, wrong = {}, {}, False
    with tempfile.TemporaryDirectory(prefix="effc-attn-bench-") as tmp:
        for attention in ("sdpa", "eager"):
            compiled, ops, err, hits = build(args.model, attention, args.layers, feed, Path(tmp))
            verdict = "" if err < TOL else "  DISAGREES with ONNX Runtime: timings below are of wrong code"
            print(f"{attention:5s}  ops {ops}  rules {hits}  max_rel vs ORT {err:.2e}{verdict}")
            wrong |= err >= TOL
            engines[attention] = _effc_runner(compiled, feed)
            outputs[attention] = compiled(feed)
        threads = configure_threads(compiled.manifest.get("threads") or 1)
        steady, idle = turns(engines, args.warmup + args.runs, args.warmup)
    between = deviation([outputs["sdpa"]], [outputs["eager"]]).max_rel
    stats = {name: _stats(steady[name]) for name in engines}
    print(f"\n{args.model}, {args.layers} layers, batch {args.batch}, {threads} threads, {args.runs} rounds x "
          f"{len(steady['sdpa']) // max(args.runs, 1)} calls (interleaved, after {args.warmup} warm-up rounds)")
    for name in engines:
        idle_ms = _stats(idle[name])["median_ms"]
        print(f"  {name:5s}  median {stats[name]['median_ms']:8.3f} ms  p90 {stats[name]['p90_ms']:8.3f} ms  "
              f"after idle {idle_ms:8.3f} ms")
    ratio = stats["sdpa"]["median_ms"] / stats["eager"]["median_ms"]
    print(f"  sdpa/eager = {ratio:.3f}   sdpa vs eager outputs max_rel {between:.2e}")
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
