"""Compile zoo models with effc and benchmark them against ONNX Runtime and torch eager;
write a markdown table (with the date and the machine's load: the machine may be shared).

    python tools/bench_zoo.py [--models vit-s16,bert-base,gpt2] [--records shipped,none] [--vs ort,torch]
                              [--work DIR] [--out docs/benchmarks.md] [--runs 15] [--profile]
                              [--target llvm|cuda --arch sm_90]

With --target cuda (a GPU needed) torch runs on the same GPU and ONNX Runtime on the CPU: its
timing is context, its outputs the agreement check. CUDA builds take no records (--records none).

--records lists the record variants to build each model with (`effc compile --records`: shipped,
none or a file from `effc tune`); each variant is compiled once per work directory (delete it to
rebuild). `effc bench` then runs the engines interleaved (see effc/codegen/bench.py for how it keeps
them from stealing each other's cores); heavy, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ("vit-s16", "bert-base", "gpt2")


def effc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc.cli", *args], capture_output=True, text=True, check=False)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def bench_model(name: str, work: Path, runs: int, threads: int | None, records: str = "shipped",
                vs: str = "ort", profile: bool = False, target: tuple[str, ...] = ("llvm",)) -> dict:
    """``target``: (kind,) or (kind, arch), as `effc compile --target KIND [--arch ARCH]` takes them."""
    out = work / f"{name}-{Path(records).stem}" if target == ("llvm",) else work / f"{name}-{'-'.join(target)}"
    row: dict = {"model": name, "records": records}
    if not (out / "model.so").exists():
        start = time.perf_counter()
        arch = ["--arch", target[1]] if len(target) > 1 else []
        proc = effc("compile", f"zoo:{name}", "-o", str(out), "--target", target[0], *arch, "--records", records)
        row["compile_s"] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["compile failed"])[-1]
            return row
    manifest = json.loads((out / "codegen.json").read_text())
    row.setdefault("compile_s", manifest.get("build_seconds"))
    row["tuned_kernels"] = manifest.get("tuned_kernels", 0)
    row["rule_hits"] = manifest.get("rule_hits", {})
    result_path = out / "bench.json"
    args = ["bench", str(out), "--vs", vs, "--runs", str(runs), "--json", str(result_path)]
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


def _ms(row: dict, engine: str) -> str:
    stats = row.get(engine)
    return f"{stats['median_ms']:.1f} / {stats['p90_ms']:.1f}" if stats else "-"


def markdown(rows: list[dict]) -> str:
    lines = [("| model | records (tuned kernels) | effc ms median / p90 | ORT ms | ORT on effc's ONNX ms | "
              "torch ms | effc/ORT | effc/ORT after idle | effc/torch | max rel err vs ORT | compile s | "
              "kernels by rule |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['records']} | error: {r['error']} | | | | | | | | | |")
            continue
        hits = ", ".join(f"{k} {v}" for k, v in sorted(r.get("rule_hits", {}).items()))
        torch_ratio = f"{r['ratio_vs_torch']:.2f}" if "ratio_vs_torch" in r else "-"
        lines.append(f"| {r['model']} | {r['records']} ({r.get('tuned_kernels', 0)}) | {_ms(r, 'effc')} | "
                     f"{_ms(r, 'ort')} | {_ms(r, 'ort_optimized')} | {_ms(r, 'torch')} | {r['ratio_vs_ort']:.2f} | "
                     f"{r['ratio_vs_ort_after_idle']:.2f} | "
                     f"{torch_ratio} | {r['max_rel_err']:.1e} | {r.get('compile_s', '')} | {hits} |")
    return "\n".join(lines) + "\n"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible to torch"


def page(rows: list[dict], started: str, load_before: str, load_after: str, target: tuple[str, ...] = ("llvm",)) -> str:
    from effc.codegen.target import llvm_target

    host = llvm_target()
    method = next((r["method"] for r in rows if "method" in r), {})
    threads = next((r["threads"] for r in rows if "threads" in r), host.threads)
    cpu = f"{platform.machine()} CPU family `{host.spec['mcpu']}` ({host.threads} cores available)"
    if target[0] == "cuda":
        title = f"# effc benchmarks (CUDA {' '.join(target[1:])})"
        setup = (f"Run {started} by `python tools/bench_zoo.py --target {' --arch '.join(target)}` on "
                 f"{gpu_name()}; effc and torch eager on the GPU, fp32, batch 1; ONNX Runtime on the {cpu} with "
                 f"{threads} threads (context and the agreement check, not a GPU engine).")
    else:
        title = "# effc benchmarks (CPU)"
        setup = (f"Run {started} by `python tools/bench_zoo.py`; {cpu}, {threads} threads for every engine, "
                 "fp32, batch 1.")
    return "\n".join([
        title, "", setup, "",
        f"Machine load (`uptime`) before: `{load_before}`", f"after: `{load_after}`", "",
        ("**Caveat: this machine is shared** (other jobs run beside the benchmark), so absolute times "
         "wander from run to run; the engines take turns within each round (interleaved), so the ratios "
         "are what to compare. Each turn starts after an idle gap (so no engine's spinning workers steal "
         "from the next; ONNX Runtime sessions stop spinning when Run returns), makes one call timed apart "
         "as *after idle*, then `burst` calls back to back: times are median / p90 in ms of those "
         "back-to-back calls after warm-up. *effc/ORT after idle* compares the first calls: a vCPU that "
         "idled comes back slow for a while here, and TVM's evenly split parallel loops wait for it "
         f"where ONNX Runtime's work stealing does not. Method: {json.dumps(method)}."), "",
        ("`records`: `shipped` = effc's tuning records for this CPU family (effc/codegen/tuned/), "
         "`none` = the CPU rules' default knobs. ORT = ONNX Runtime 1.31 on the original model; "
         "max rel err = scale-relative difference from ONNX Runtime on the same (optimized) model."), "",
        markdown(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--records", default="shipped,none", help="Comma-separated record variants.")
    parser.add_argument("--vs", default="ort,torch")
    parser.add_argument("--work", default="bench-work", type=Path)
    parser.add_argument("--out", default=Path("docs/benchmarks.md"), type=Path)
    parser.add_argument("--runs", default=15, type=int)
    parser.add_argument("--threads", default=None, type=int)
    parser.add_argument("--profile", action="store_true", help="Also print each model's slowest kernels.")
    parser.add_argument("--target", default="llvm", choices=("llvm", "cuda"))
    parser.add_argument("--arch", default=None, help="CUDA arch (sm_80, sm_90) for --target cuda.")
    args = parser.parse_args()
    target = (args.target, args.arch) if args.arch else (args.target,)
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_before = load()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for records in [r.strip() for r in args.records.split(",") if r.strip()]:
            print(f"{name} (records: {records}) ...", flush=True)
            rows.append(bench_model(name, args.work, args.runs, args.threads, records, args.vs, args.profile, target))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # a partial page survives an interrupt
            args.out.write_text(page(rows, started, load_before, load(), target))
    print(markdown(rows))


if __name__ == "__main__":
    main()
