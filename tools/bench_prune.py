"""Acceptance figures of issue 16 (speed side): a token-pruned zoo model compiled by effc against the
unpruned compiled model and against ONNX Runtime on the pruned ONNX, in one interleaved run.

    python tools/bench_prune.py [--model vit-s16] [--methods zero-tprune,tome,topk] [--keep 0.65]
                                [--threads 2] [--runs 15] [--work DIR] [--profile]

Each variant is compiled once per work directory (`effc compile --target llvm`, the default exact
passes, plus prune-tokens for the pruned ones; delete DIR to rebuild). The engines then run in
turns (effc/codegen/bench.py's loop: idle gap, one call after idle, 3 back-to-back calls) at batch 1.
Printed: the median ms per engine, the speed-up of each pruned module over the unpruned one, its
ratio to ONNX Runtime on the same pruned ONNX file, and the compiled module's deviation from that
ONNX Runtime run (scale-relative, effc.verify.deviation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

EXACT = "fold-batchnorm,layernorm-to-rmsnorm"


def compile_variant(model: str, out: Path, method: str | None, keep: float) -> None:
    if (out / "model.so").exists():
        return
    passes = EXACT + (",prune-tokens" if method else "")
    cmd = [sys.executable, "-m", "effc.cli", "compile", f"zoo:{model}", "-o", str(out), "--passes", passes,
           "--target", "llvm"]
    if method:
        cmd += ["--set", f"prune-tokens.method={method}", "--set", f"prune-tokens.keep={keep}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compile of {out.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-s16")
    parser.add_argument("--methods", default="zero-tprune,tome,topk")
    parser.add_argument("--keep", type=float, default=0.65)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", default="/tmp/effc-bench-prune")
    parser.add_argument("--profile", action="store_true", help="also print the slowest kernels of each pruned module")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from effc import zoo
    from effc.codegen.bench import ORT_CONFIG, _effc_runner, turns
    from effc.codegen.runtime import configure_threads, load_compiled
    from effc.verify import OrtRunner, deviation

    work = Path(args.work)
    methods = [m for m in args.methods.split(",") if m]
    variants = {"unpruned": None, **{m: m for m in methods}}
    for name, method in variants.items():
        print(f"compiling {name} ...", file=sys.stderr)
        compile_variant(args.model, work / name, method, args.keep)
    configure_threads(args.threads)
    feeds = zoo.get(args.model).sample_inputs(2, 0)
    feed = feeds[0]
    engines, sessions, compiled = {}, {}, {}
    for name in variants:
        compiled[name] = load_compiled(work / name, args.threads)
        engines[f"effc:{name}"] = _effc_runner(compiled[name], feed)
        sessions[name] = OrtRunner(work / name / "model.onnx", threads=args.threads, config=ORT_CONFIG)
        engines[f"ort:{name}"] = (lambda s: lambda: s(feed))(sessions[name])
    steady, _ = turns(engines, args.warmup + args.runs, args.warmup)
    median = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in steady.items()}
    result = {"model": args.model, "keep": args.keep, "threads": args.threads, "median_ms": median, "variants": {}}
    for name in variants:
        got = [compiled[name](f) for f in feeds]
        err = deviation(got, sessions[name].run_all(feeds)).max_rel
        row = {"effc_ms": median[f"effc:{name}"], "ort_ms": median[f"ort:{name}"], "max_rel_vs_ort": err,
               "speedup_vs_unpruned_effc": median["effc:unpruned"] / median[f"effc:{name}"],
               "effc_vs_ort_same_onnx": median[f"effc:{name}"] / median[f"ort:{name}"]}
        report = json.loads((work / name / "report.json").read_text())
        for rec in report.get("passes", []):
            if rec.get("name") == "prune-tokens":
                row["flops"] = [rec.get("flops_before"), rec.get("flops_after")]
                row["tokens"] = next((r["details"]["tokens"] for r in rec.get("rewrites", [])
                                      if r.get("action") == "schedule"), None)
        result["variants"][name] = row
    print(json.dumps(result, indent=1))
    print(f"\n| variant | tokens per block | FLOPs kept | effc ms | ORT ms (same ONNX) | effc speed-up vs unpruned effc "
          f"| effc / ORT | max rel vs ORT |\n|---|---|---|---|---|---|---|---|")
    for name, row in result["variants"].items():
        flops = row.get("flops")
        kept = f"{flops[1] / flops[0]:.3f}" if flops and flops[0] else "1"
        tokens = ",".join(map(str, row.get("tokens") or [])) or "all"
        print(f"| {name} | {tokens} | {kept} | {row['effc_ms']:.2f} | {row['ort_ms']:.2f} | "
              f"{row['speedup_vs_unpruned_effc']:.2f}x | {row['effc_vs_ort_same_onnx']:.2f} | {row['max_rel_vs_ort']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.profile:
        for name in methods:
            out = subprocess.run([sys.executable, "-m", "effc.cli", "bench", str(work / name), "--profile",
                                  "--runs", "5", "--threads", str(args.threads), "--top", "12"],
                                 capture_output=True, text=True, check=False)
            print(f"\n### profile {name}\n{out.stdout[-4000:]}")


if __name__ == "__main__":
    main()
