"""effc --precision bf16 against effc fp32, ONNX Runtime fp32 and OpenVINO (its default precision,
and f32), on the same ONNX model, timed side by side in one process; writes a markdown table.

    python tools/bench_bf16.py [--models vit-s16,bert-base,gpt2] [--work DIR] [--out docs/bf16.md]
                               [--runs 10] [--threads 2] [--cpu-time]

Each model is compiled once per work directory (`effc compile zoo:NAME --passes none --precision P`,
so every engine runs the same graph; delete the directory to rebuild). Timing uses effc bench's
interleaved turns (effc/codegen/bench.py): per round each engine idles, runs once, then 3 times back
to back; the table gives medians of the back-to-back calls. Each engine's output is compared with
ONNX Runtime fp32 on the zoo sample (max rel err, cosine). OpenVINO is optional: without it, its
columns are left out. --cpu-time measures each call's process CPU time with every engine on one
thread instead: on a machine shared with other load (where a 2-thread engine waits for a descheduled
core: effc's evenly split parallel loops suffer most) it measures the work, not the wait.
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

import numpy as np

DEFAULT_MODELS = ("vit-s16", "bert-base", "gpt2")


def compile_variant(name: str, precision: str, work: Path) -> Path:
    out = work / f"{name}-{precision}"
    if not (out / "model.so").exists():
        proc = subprocess.run([sys.executable, "-m", "effc.cli", "compile", f"zoo:{name}", "-o", str(out),
                               "--passes", "none", "--target", "llvm", "--precision", precision],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} {precision}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return out


def openvino_engines(path: Path, threads: int, feed: dict) -> dict:
    """name -> (run, outputs, precision) for OpenVINO's default and its f32, or {} without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    core = ov.Core()
    engines = {}
    for label, extra in (("openvino", {}), ("openvino_f32", {"INFERENCE_PRECISION_HINT": "f32"})):
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, **extra})
        request = compiled.create_infer_request()
        inputs = {port.any_name: feed[port.any_name] for port in compiled.inputs}

        def outputs(request=request, compiled=compiled, inputs=inputs):
            request.infer(inputs)
            return {port.any_name: np.array(request.get_tensor(port).data) for port in compiled.outputs}

        engines[label] = ((lambda r=request, i=inputs: r.infer(i)), outputs,
                          str(compiled.get_property("INFERENCE_PRECISION_HINT")))
    return engines


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench_model(name: str, work: Path, runs: int, threads: int, cpu_time: bool = False) -> dict:
    from effc import zoo
    from effc.codegen.bench import ORT_CONFIG, _effc_runner, _stats, turns
    from effc.codegen.runtime import configure_threads, load_compiled
    from effc.verify import OrtRunner, deviation
    from effc.zoo.cache import cached_model_path

    path = cached_model_path(name)
    feed = zoo.get(name).sample_inputs(1, 0)[0]
    configure_threads(threads)
    row, engines, outputs, precision = {"model": name}, {}, {}, {}
    for p in ("fp32", "bf16"):
        compiled = load_compiled(compile_variant(name, p, work), threads)
        engines[f"effc_{p}"] = _effc_runner(compiled, feed)
        outputs[f"effc_{p}"] = (lambda c=compiled: c(feed))
        precision[f"effc_{p}"] = compiled.manifest["precision"]
    ort = OrtRunner(path, threads=threads, config=ORT_CONFIG)
    engines["ort"], outputs["ort"], precision["ort"] = (lambda: ort(feed)), (lambda: ort(feed)), "fp32"
    for label, (run, out, prec) in openvino_engines(path, threads, feed).items():
        engines[label], outputs[label], precision[label] = run, out, prec
    reference = [ort(feed)]
    for label, out in outputs.items():
        got = out()
        dev = deviation([{k: got[k] for k in reference[0] if k in got} or got], reference)
        row[label] = {"precision": precision[label], "max_rel": dev.max_rel, "cosine": dev.cosine}
    steady, _ = turns(engines, runs + 3, 3, **({"measure": cpu_seconds} if cpu_time else {}))
    for label in engines:
        row[label].update(_stats(steady[label]))
    return row


def table(rows: list[dict], threads: int, cpu_time: bool = False) -> str:
    labels = [k for k in ("effc_bf16", "effc_fp32", "ort", "openvino", "openvino_f32") if any(k in r for r in rows)]
    head = "| model | " + " | ".join(labels) + " | effc bf16 / OpenVINO default |"
    lines = [head, "|" + "---|" * (len(labels) + 2)]
    for r in rows:
        cells = [f"{r[k]['median_ms']:.1f} ms ({r[k]['precision']}; rel {r[k]['max_rel']:.1e}, cos "
                 f"{r[k]['cosine']:.5f})" if k in r else "-" for k in labels]
        ratio = f"{r['effc_bf16']['median_ms'] / r['openvino']['median_ms']:.2f}" if "openvino" in r else "-"
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {ratio} |")
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    what = "1 thread, CPU time per call" if cpu_time else f"{threads} threads, wall time per call"
    return (f"{what}, batch 1, medians of back-to-back calls, interleaved in one process; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
            f"({load}). In brackets: the precision each engine ran and its deviation from ONNX Runtime fp32 "
            f"(max rel err, cosine) on the zoo sample.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/effc-bench-bf16"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="1 thread per engine, process CPU time per call")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, args.work, args.runs, args.threads, args.cpu_time))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args.threads, args.cpu_time)
    print(text)
    if args.out:
        with open(args.out, "a") as handle:  # a wall-time and a CPU-time run append to one page
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
