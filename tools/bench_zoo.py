"""Compile zoo models for llvm with effc and benchmark them against ONNX Runtime; write a markdown table.

    python tools/bench_zoo.py [--models vit-s16,bert-base,gpt2] [--work DIR] [--out bench.md] [--runs 15]
                              [--records records.json] [--profile]

Each model is compiled once per work directory (delete it to rebuild), then `effc bench --vs ort`
runs interleaved; heavy, so run it on an otherwise idle machine and one model at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ("vit-s16", "bert-base", "gpt2")


def effc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc.cli", *args], capture_output=True, text=True)


def bench_model(name: str, work: Path, runs: int, threads: int | None, records: Path | None = None,
                profile: bool = False) -> dict:
    out = work / name
    row: dict = {"model": name}
    if not (out / "model.so").exists():
        start = time.perf_counter()
        proc = effc("compile", f"zoo:{name}", "-o", str(out), "--target", "llvm",
                    *(["--records", str(records)] if records else []))
        row["compile_s"] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["compile failed"])[-1]
            return row
    manifest = json.loads((out / "codegen.json").read_text())
    row.setdefault("compile_s", manifest.get("build_seconds"))
    row["rule_hits"] = manifest.get("rule_hits", {})
    result_path = out / "bench.json"
    args = ["bench", str(out), "--vs", "ort", "--runs", str(runs), "--json", str(result_path)]
    if threads:
        args += ["--threads", str(threads)]
    if profile:
        args += ["--profile", "--top", "8"]
    proc = effc(*args)
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["bench failed"])[-1]
        return row
    row.update(json.loads(result_path.read_text()))
    if profile:
        print(proc.stdout, flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | effc median ms | effc p90 ms | ORT median ms | ORT p90 ms | effc/ORT | max rel err | "
             "build s | kernels by rule |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | |")
            continue
        hits = ", ".join(f"{k} {v}" for k, v in sorted(r.get("rule_hits", {}).items()))
        lines.append(f"| {r['model']} | {r['effc']['median_ms']:.1f} | {r['effc']['p90_ms']:.1f} | "
                     f"{r['ort']['median_ms']:.1f} | {r['ort']['p90_ms']:.1f} | {r['ratio_vs_ort']:.2f} | "
                     f"{r['max_rel_err']:.1e} | {r.get('compile_s', '')} | {hits} |")
    threads = next((r.get("threads") for r in rows if "threads" in r), None)
    lines.append("")
    lines.append(f"threads: {threads}; medians over interleaved runs after warm-up (effc bench).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--work", default="bench-work", type=Path)
    parser.add_argument("--out", default="bench.md", type=Path)
    parser.add_argument("--runs", default=15, type=int)
    parser.add_argument("--threads", default=None, type=int)
    parser.add_argument("--records", default=None, type=Path, help="Tuning records for the builds (effc tune).")
    parser.add_argument("--profile", action="store_true", help="Also print each model's slowest kernels.")
    args = parser.parse_args()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"{name} ...", flush=True)
        rows.append(bench_model(name, args.work, args.runs, args.threads, args.records, args.profile))
        args.out.write_text(markdown(rows))  # partial table survives an interrupted run
    print(markdown(rows))


if __name__ == "__main__":
    main()
