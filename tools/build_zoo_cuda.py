"""Build every zoo model for CUDA with `effc compile --target cuda --arch ARCH` (no GPU needed:
nvcc only) and print each build's wall time and rule hits as a markdown table.

    python tools/build_zoo_cuda.py [--models a,b] [--arch sm_90] [--work DIR]

tests/codegen/test_cuda_zoo.py builds the small zoo models on every run; this covers the large
ones (vit-s16, bert-base, gpt2: minutes each), too slow for the suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(name: str, arch: str, work: Path) -> dict:
    out = work / f"{name}-{arch}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "effc.cli", "compile", f"zoo:{name}", "-o", str(out),
                           "--target", "cuda", "--arch", arch], capture_output=True, text=True, check=False)
    row = {"model": name, "wall_s": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return row
    manifest = json.loads((out / "codegen.json").read_text())
    row.update(build_s=manifest["build_seconds"], rule_hits=manifest["rule_hits"],
               so_mb=round((out / "model.so").stat().st_size / 2**20, 1))
    return row


def markdown(rows: list[dict], arch: str) -> str:
    lines = [f"| model ({arch}) | effc compile s | of which TVM build s | model.so MB | kernels by rule |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['wall_s']} | error: {r['error']} | | |")
        else:
            hits = ", ".join(f"{k} {v}" for k, v in sorted(r["rule_hits"].items()))
            lines.append(f"| {r['model']} | {r['wall_s']} | {r['build_s']} | {r['so_mb']} | {hits} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from effc import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.MODELS))
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--work", default="cuda-work", type=Path)
    args = parser.parse_args()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(build(name, args.arch, args.work))
        print(f"{name}: {rows[-1].get('error') or str(rows[-1]['wall_s']) + ' s'}", flush=True)
    print(markdown(rows, args.arch))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
