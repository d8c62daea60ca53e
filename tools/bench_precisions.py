"""Engines x precisions x models on this CPU: ONNX Runtime, OpenVINO and effc at fp32, bf16 and int8,
timed in one interleaved run per model; writes docs/precisions.md.

    python tools/bench_precisions.py [--models vit-s16,bert-base,gpt2] [--work bench-work/precisions]
                                     [--runs 8] [--warmup 2] [--threads 2] [--out docs/precisions.md]
                                     [--build-only]

Per model (batch 1; bert-base and gpt2 at seq 128, the zoo's length), each engine on the same feed:
- ORT fp32, OpenVINO f32 (INFERENCE_PRECISION_HINT=f32), OpenVINO default (the precision it picks
  for this CPU, stated), effc fp32 (`effc compile zoo:NAME`);
- effc bf16 (`effc compile --precision bf16`) once `effc compile` has that option, else "not built";
- a QDQ int8 copy made by ONNX Runtime's quantize_static (u8 activations, per-channel s8 weights,
  MinMax over CALIBRATION zoo samples that are not the bench feed), run by ORT and OpenVINO, and by
  effc once it lowers QDQ to integer kernels (`effc compile QDQ`, with `--precision int8` where that
  option exists), else "not built".
Compiled modules and QDQ copies are cached in --work (delete a directory to rebuild it). Latency is
the median of back-to-back calls after warm-up (effc/codegen/bench.py's turns: every engine takes
its turn in every round after an idle gap), reported relative to ORT fp32; the deviation table
compares every engine's output with ORT fp32's on the bench feed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ("vit-s16", "bert-base", "gpt2")
CALIBRATION = 4  # zoo samples (seed 1; the bench feed is seed 0's first)
COLUMNS = ("ORT fp32", "OpenVINO f32", "OpenVINO default", "effc fp32", "effc bf16",
           "ORT int8 (QDQ)", "OpenVINO int8 (QDQ)", "effc int8 (QDQ)")
NOT_BUILT = "not built"


def effc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc.cli", *args], capture_output=True, text=True, check=False)


def effc_precisions() -> set[str]:
    """The low precisions effc builds: bf16 (and int8) when `effc compile --precision` lists them, read
    from its --help; int8 also when effc lowers QDQ graphs to integer kernels (effc.codegen.qdq_lowering)."""
    import importlib.util

    offered = precision_option()
    if importlib.util.find_spec("effc.codegen.qdq_lowering") is not None:
        offered.add("int8")
    return offered


def precision_option() -> set[str]:
    """The low precisions `effc compile --precision` lists in its --help."""
    text = effc("compile", "--help").stdout
    match = re.search(r"--precision\b(.*?)(?=\n\s*--|\Z)", text, re.S)
    return set(re.findall(r"\b(bf16|int8)\b", match.group(1))) if match else set()


def compiled(out: Path, source: str, *extra: str) -> tuple[Path | None, str]:
    """(OUT, "") after `effc compile SOURCE -o OUT EXTRA` (cached), or (None, its one-line error)."""
    if not (out / "model.so").exists():
        proc = effc("compile", source, "-o", str(out), "--target", "llvm", *extra)
        if proc.returncode != 0:
            return None, (proc.stderr.strip().splitlines() or ["compile failed"])[-1]
    return out, ""


def qdq_copy(name: str, fp32: Path, work: Path, samples=None) -> tuple[Path | None, str]:
    """ONNX Runtime's static QDQ int8 copy of ``fp32`` (cached), or (None, why not); calibrated on
    ``samples()`` (a list of feeds; default: CALIBRATION zoo samples of ``name``)."""
    path = work / f"{name}-qdq.onnx"
    if path.exists():
        return path, ""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    from effc import zoo

    class Samples(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(samples() if samples else zoo.get(name).sample_inputs(CALIBRATION, 1))

        def get_next(self):
            return next(self.feeds, None)

    logging.getLogger().setLevel(logging.ERROR)  # its per-tensor fallback warnings, one per weight
    try:
        quantize_static(str(fp32), str(path), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # noqa: BLE001 (the table says why the column is empty)
        path.unlink(missing_ok=True)
        return None, f"quantize_static failed: {str(exc).strip().splitlines()[0][:120]}"
    return path, ""


class EffcEngine:
    def __init__(self, out: Path, feed: dict, threads: int):
        from effc.codegen.bench import _effc_runner
        from effc.codegen.runtime import load_compiled

        self.module = load_compiled(out, threads)
        self.call = _effc_runner(self.module, feed)
        self.precision = self.module.manifest.get("precision", "fp32")

    def __call__(self):
        return self.call()

    def run(self, feed: dict) -> dict:
        return self.module(feed)


class OrtEngine:
    def __init__(self, model: Path, feed: dict, threads: int):
        from effc.codegen.bench import ORT_CONFIG
        from effc.verify import OrtRunner

        self.runner, self.feed = OrtRunner(model, threads=threads, config=ORT_CONFIG), feed

    def __call__(self):
        return self.runner(self.feed)

    def run(self, feed: dict) -> dict:
        return self.runner(feed)


def engines_for(name: str, work: Path, feed: dict, threads: int, offered: set[str], model: Path | None = None,
                samples=None, flags: tuple = (), int8: bool = True) -> tuple[dict, dict]:
    """(column -> engine, column -> why it has none) for one model; builds what is not cached.
    ``model``: an ONNX file instead of the zoo's ``name``, with ``samples`` for qdq_copy; ``flags``:
    more `effc compile` options for every effc column; ``int8``: False leaves the QDQ columns out."""
    from effc.codegen.openvino_engine import OpenVinoEngine
    from effc.zoo.cache import cached_model_path

    fp32 = model or cached_model_path(name)
    source = str(model) if model else f"zoo:{name}"
    engines, missing = {}, {}

    def add(column, make):
        try:
            engines[column] = make()
        except Exception as exc:  # noqa: BLE001 (one engine's failure is a table cell, not the end)
            missing[column] = f"error: {str(exc).strip().splitlines()[0][:120]}"

    def effc_column(column, out, source, *extra):
        start = time.perf_counter()
        built, error = compiled(out, source, *extra, *flags)
        print(f"  {column}: {'built' if built else error} ({time.perf_counter() - start:.0f} s)", flush=True)
        if built:
            add(column, lambda: EffcEngine(built, feed, threads))
        else:
            missing[column] = f"error: {error}"

    add("ORT fp32", lambda: OrtEngine(fp32, feed, threads))
    add("OpenVINO f32", lambda: OpenVinoEngine(fp32, feed, threads, "f32"))
    add("OpenVINO default", lambda: OpenVinoEngine(fp32, feed, threads))
    effc_column("effc fp32", work / f"{name}-fp32", source)
    if "bf16" in offered:
        effc_column("effc bf16", work / f"{name}-bf16", source, "--precision", "bf16")
    else:
        missing["effc bf16"] = NOT_BUILT
    if not int8:
        return engines, missing
    start = time.perf_counter()
    qdq, why = qdq_copy(name, fp32, work, samples)
    print(f"  QDQ copy: {qdq or why} ({time.perf_counter() - start:.0f} s)", flush=True)
    if qdq is None:
        missing.update({c: why for c in ("ORT int8 (QDQ)", "OpenVINO int8 (QDQ)", "effc int8 (QDQ)")})
    else:
        add("ORT int8 (QDQ)", lambda: OrtEngine(qdq, feed, threads))
        add("OpenVINO int8 (QDQ)", lambda: OpenVinoEngine(qdq, feed, threads))
        if "int8" in offered:
            flags = ("--precision", "int8") if "int8" in precision_option() else ()
            effc_column("effc int8 (QDQ)", work / f"{name}-int8", str(qdq), *flags)
        else:
            missing["effc int8 (QDQ)"] = NOT_BUILT
    return engines, missing


def bench_model(name: str, work: Path, threads: int, runs: int, warmup: int, offered: set[str],
                feed: dict | None = None, measure=None, **model) -> dict:
    """One row of the tables; ``feed`` (default: the zoo's, `effc bench`'s) and ``model``: as engines_for;
    ``measure``: turns' sample of one call (default wall time)."""
    import numpy as np

    from effc import zoo
    from effc.codegen.bench import turns
    from effc.verify import deviation

    feed = feed if feed is not None else zoo.get(name).sample_inputs(1, 0)[0]  # `effc bench`'s default feed
    engines, missing = engines_for(name, work, feed, threads, offered, **model)
    start = time.perf_counter()
    steady, _ = turns(engines, warmup + runs, warmup, **({"measure": measure} if measure else {}))
    print(f"  timed {len(engines)} engines x {runs} rounds ({time.perf_counter() - start:.0f} s)", flush=True)
    row = {"model": name, "missing": missing, "ms": {}, "precision": {}, "max_rel": {}, "cosine": {}}
    reference = [engines["ORT fp32"].run(feed)] if "ORT fp32" in engines else None
    for column, engine in engines.items():
        row["ms"][column] = round(float(np.median(steady[column])) * 1e3, 2)
        row["precision"][column] = getattr(engine, "precision", None)
        if reference is not None:
            dev = deviation([engine.run(feed)], reference)
            row["max_rel"][column], row["cosine"][column] = dev.max_rel, dev.cosine
    return row


def _cell(row: dict, column: str, value: str) -> str:
    return value if column in row["ms"] else row["missing"].get(column, "-")


def markdown(rows: list[dict]) -> str:
    head = "| model | ORT fp32 ms | " + " | ".join(COLUMNS) + " |"
    rule = "|---|---|" + "---|" * len(COLUMNS)
    latency = [head, rule]
    accuracy = ["| model | " + " | ".join(COLUMNS[1:]) + " |", "|---|" + "---|" * (len(COLUMNS) - 1)]
    for r in rows:
        base = r["ms"].get("ORT fp32")
        ratio = {c: f"{r['ms'][c] / base:.2f}" if base else f"{r['ms'][c]:.1f} ms" for c in r["ms"]}
        latency.append(f"| {r['model']} | {base if base else '-'} | "
                       + " | ".join(_cell(r, c, ratio.get(c, "")) for c in COLUMNS) + " |")
        dev = {c: f"{r['max_rel'][c]:.1e} / {r['cosine'][c]:.5f}" for c in r["max_rel"]}
        accuracy.append(f"| {r['model']} | " + " | ".join(_cell(r, c, dev.get(c, "")) for c in COLUMNS[1:]) + " |")
    return "\n".join(latency) + "\n", "\n".join(accuracy) + "\n"


def cpu_line() -> str:
    from effc.codegen.target import cpuinfo_flags, llvm_target

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = cpuinfo_flags()
    has = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    amx = "AMX present" if "amx_bf16" in flags else "no AMX"
    return (f"{platform.machine()} `{model}`, LLVM CPU family `{llvm_target().spec['mcpu']}`, {amx} "
            f"(features: {', '.join(has) or 'none of avx512f/bf16/vnni/amx'})")


def _bf16_hardware() -> str:
    """What OpenVINO's default precision runs on, on this CPU."""
    from effc.codegen.target import cpuinfo_flags

    flags = cpuinfo_flags()
    if "amx_bf16" in flags:
        return "this CPU has AMX-BF16 tiles, which OpenVINO (oneDNN) uses for bf16 by default"
    if "avx512_bf16" in flags:
        return "this CPU has AVX-512 BF16 but no AMX tiles"
    return "this CPU has no bf16 arithmetic"


def page(rows: list[dict], started: str, load_before: str, load_after: str, threads: int, runs: int,
         warmup: int, offered: set[str]) -> str:
    import onnxruntime
    import openvino

    latency, accuracy = markdown(rows)
    default_precision = sorted({r["precision"].get("OpenVINO default") for r in rows} - {None})
    return "\n".join([
        "# effc at every precision, beside ONNX Runtime and OpenVINO (CPU)", "",
        f"Run {started} by `python tools/bench_precisions.py` on {cpu_line()}; {threads} threads for every "
        f"engine, batch 1, bert-base and gpt2 at seq 128. ONNX Runtime {onnxruntime.__version__}, OpenVINO "
        f"{openvino.__version__.split('-')[0]}.", "",
        f"Machine load (`uptime`) before: `{load_before}`", f"after: `{load_after}`", "",
        ("**This machine is shared** (other jobs run beside the benchmark): absolute times wander, so read "
         "the ratios, which come from one interleaved run per model (every engine takes its turn in every "
         f"round, after an idle gap; {warmup} warm-up rounds dropped, then the median of {runs} rounds x 3 "
         f"back-to-back calls; see effc/codegen/bench.py).{_overload_note(load_before, load_after)}"), "",
        ("Columns: OpenVINO f32 = `INFERENCE_PRECISION_HINT=f32`; OpenVINO default = the precision it picks "
         f"for this CPU (it reported {', '.join(default_precision) or '?'}: {_bf16_hardware()}); "
         "int8 (QDQ) = a copy made by ONNX Runtime's "
         f"`quantize_static` (QDQ format, u8 activations, per-channel s8 weights, MinMax over {CALIBRATION} "
         "zoo samples other than the bench feed), run as is by each engine. effc bf16: "
         f"{'`effc compile --precision bf16`' if 'bf16' in offered else NOT_BUILT + ' (no `--precision bf16` here)'}; "
         "effc int8 (QDQ): "
         f"{'`effc compile` of the QDQ copy (its QDQ matmuls lowered to int8 kernels)' if 'int8' in offered else NOT_BUILT}."), "",
        "## Latency relative to ONNX Runtime fp32 (lower is faster)", "", latency,
        "## Deviation from ONNX Runtime fp32 on the bench feed (max scale-relative error / cosine)", "",
        ("The int8 columns measure the QDQ copy's own rounding (MinMax over a few samples, per-tensor "
         "activation scales; vit-s16, bert-base and gpt2 are random-init zoo models), which ORT and "
         "OpenVINO share; OpenVINO's precision hint on the QDQ copy (bf16 here) applies to what stays float."),
        "", accuracy])


def _overload_note(*loads: str) -> str:
    """A warning when the load average exceeded the cores during the run (other jobs' threads then
    share the cores with the engines: every time is inflated, the ratios much less)."""
    import os

    averages = [float(v) for text in loads for v in re.findall(r"(\d+\.\d+)", text.split("load average")[-1])]
    cores = os.cpu_count() or 1
    if not averages or max(averages) <= cores:
        return ""
    return (f" **In this run the load average reached {max(averages):.1f} on {cores} CPUs**: the engines shared "
            "the cores with other jobs, so absolute times are many times an idle machine's and the ratios "
            "carry more noise than usual.")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--work", default=Path("bench-work/precisions"), type=Path)
    parser.add_argument("--out", default=Path("docs/precisions.md"), type=Path)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build-only", action="store_true",
                        help="build (or find in --work) every engine's model and stop: the timed run can then "
                             "wait for a quiet machine")
    args = parser.parse_args()
    from effc.codegen.openvino_engine import import_openvino
    from effc.codegen.runtime import configure_threads

    import_openvino()
    configure_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    offered = effc_precisions()
    print(f"effc compile --precision offers: {', '.join(sorted(offered)) or 'no low precision'}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before, rows = uptime(), []
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        if args.build_only:
            from effc import zoo

            engines_for(name, args.work, zoo.get(name).sample_inputs(1, 0)[0], args.threads, offered)
            continue
        rows.append(bench_model(name, args.work, args.threads, args.runs, args.warmup, offered))
        gc.collect()
        (args.work / "results.json").write_text(json.dumps(rows, indent=1))
    if args.build_only:
        return
    text = page(rows, started, load_before, uptime(), args.threads, args.runs, args.warmup, offered)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
