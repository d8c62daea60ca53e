"""Peak memory of Entropy calibration on bert-base (issue 13: under 2 GiB over 256 samples), effc against ONNX Runtime.

    python tools/quantize_calib_memory.py [--model bert-base] [--samples 256] [--cap-gib 4] [--timeout 900]
                                          [--runs effc-observe,effc-compile,ort-entropy]

Each run is a child process; its peak resident memory is the kernel's high-water mark (VmHWM, returned
by wait4 as ru_maxrss), so it counts everything the process held, model and ONNX Runtime included.
- effc-observe: effc's calibration alone (the quantize pass's streamed histograms over the inputs of the
  linears it selects, then the Entropy ranges), with the child's resident size after loading the model
  for reference;
- effc-compile: the whole `effc compile --passes quantize --set quantize.calibrate=entropy` on the same
  feeds (calibration, weight quantization, per-layer records, verification);
- ort-entropy: onnxruntime.quantization.quantize_static, Entropy, MatMul/Gemm, the same feeds. Its
  calibrator keeps every activation of every sample (its issue #10503), so it runs under a cap: the parent
  polls the child's resident size and kills it past --cap-gib or --timeout, reporting how many samples the
  calibration reader had handed out by then.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def own(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# --- children ------------------------------------------------------------------------------

def child_effc_observe(model_name: str, calib: Path) -> None:
    from effc.calib import load_npz
    from effc.frontend.onnx import load
    from effc.passes._observers import observe
    from effc.passes.base import PassOutcome
    from effc.passes.quantize import Options, select
    from effc.zoo.cache import cached_model_path

    model = load(cached_model_path(model_name))
    feeds = load_npz(calib)
    gc.collect()
    print(f"loaded: resident {own('VmRSS') / GIB:.2f} GiB, peak while loading {own('VmHWM') / GIB:.2f} GiB",
          flush=True)
    # Reset the high-water mark to the current resident size (Linux >= 4.0), so the next reading is the
    # peak of calibration itself, the model in memory included.
    Path("/proc/self/clear_refs").write_text("5")
    selected = select(model, Options(calibrate="entropy"), 0, PassOutcome())
    start = time.perf_counter()
    observers = observe(model, feeds, [lin.x.name for lin in selected], progress=False)
    ranges = {name: obs.range("entropy", 99.99) for name, obs in observers.items()}
    state = sum(obs.nbytes for obs in observers.values())
    print(f"observed {len(ranges)} values over {len(feeds)} samples in {time.perf_counter() - start:.0f} s; "
          f"observer state {state / 1024:.0f} KiB; peak during calibration {own('VmHWM') / GIB:.2f} GiB",
          flush=True)


def child_ort_entropy(model_name: str, calib: Path, progress: Path) -> None:
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from effc.zoo.cache import cached_model_path

    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    count = len(next(iter(arrays.values())))

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= count:
                return None
            feed = {k: v[self.i:self.i + 1] for k, v in arrays.items()}
            self.i += 1
            progress.write_text(str(self.i))
            return feed

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        quantize_static(str(cached_model_path(model_name)), f"{tmp}/q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Entropy)
        print(f"quantize_static Entropy finished in {time.perf_counter() - start:.0f} s", flush=True)


# --- parent --------------------------------------------------------------------------------

def measure(cmd: list[str], cap: int, timeout: float, progress: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, seen = None, 0
    while True:  # reaped here with wait4, not by Popen.poll: wait4 returns the child's peak RSS
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        seen = max(seen, rss_bytes(proc.pid))
        elapsed = time.perf_counter() - start
        if killed is None and (seen > cap or elapsed > timeout):
            killed = f"resident {seen / GIB:.2f} GiB > cap {cap / GIB:.1f} GiB" if seen > cap else f"timeout {timeout:.0f} s"
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read() if proc.stdout else ""
    result = {"peak_gib": usage.ru_maxrss * 1024 / GIB, "seconds": time.perf_counter() - start,
              "exit": proc.returncode, "killed": killed,
              "output": [line for line in out.splitlines() if line.strip()][-3:]}
    if progress is not None and progress.exists():
        result["samples_read"] = int(progress.read_text() or 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--cap-gib", type=float, default=4.0, help="kill ONNX Runtime's run past this resident size")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--runs", default="effc-observe,effc-compile,ort-entropy")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calib", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "effc-observe":
        return child_effc_observe(args.model, args.calib)
    if args.child == "ort-entropy":
        return child_ort_entropy(args.model, args.calib, args.progress)

    from effc.calib import save_npz, zoo_calibration

    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="qmem-") as tmp:
        calib = save_npz(zoo_calibration(args.model, args.samples), Path(tmp) / "calib.npz")
        cap = int(args.cap_gib * GIB)
        for run in filter(None, args.runs.split(",")):
            progress = None
            if run == "effc-observe":
                cmd = [*me, "--child", run, "--model", args.model, "--calib", str(calib)]
            elif run == "effc-compile":
                cmd = [sys.executable, "-m", "effc.cli", "compile", f"zoo:{args.model}", "-o", f"{tmp}/out",
                       "--passes", "quantize", "--set", "quantize.calibrate=entropy", "--calib", str(calib)]
            elif run == "ort-entropy":
                progress = Path(tmp) / "progress"
                cmd = [*me, "--child", run, "--model", args.model, "--calib", str(calib), "--progress", str(progress)]
            else:
                raise SystemExit(f"unknown run '{run}'")
            r = measure(cmd, cap if run == "ort-entropy" else 64 * GIB, args.timeout, progress)
            read = f", {r['samples_read']} of {args.samples} samples read" if "samples_read" in r else ""
            state = f"killed ({r['killed']})" if r["killed"] else f"exit {r['exit']}"
            print(f"{run:13s} {args.model} entropy {args.samples} samples: peak {r['peak_gib']:.2f} GiB, "
                  f"{r['seconds']:.0f} s, {state}{read}", flush=True)
            for line in r["output"]:
                print(f"    {line}", flush=True)


if __name__ == "__main__":
    main()
