"""End-to-end speed of gpt2 with every block linear at shift-add q bits, compiled for llvm, against
ONNX Runtime fp32 on the original model, at seq 1 (a decode-like step) and seq 128 (a prefill).

    python tools/bench_shift_add_gpt2.py [--seq 1,128] [--bits 3] [--work DIR] [--runs 10] [-o FILE.md]

Per sequence length: the zoo's gpt2 is exported at that length (the zoo itself fixes 128), the
shift-add pass quantizes it (calibrated on the zoo's calibration set at 128; at other lengths
uncalibrated, which changes the weights' values, not the kernels or their speed), `effc compile`
lowers every effc.ShiftAddMatMul to the LUT kernels, and `effc bench` times it interleaved with
ONNX Runtime on the fp32 export. Slow: the pass takes minutes per model on this machine; each
step's output is kept in --work and reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

CALIBRATED_SEQ = 128  # the zoo's calibration samples have this length


def effc(*args: str) -> None:
    from bench_zoo import effc as run  # tools/ is on sys.path: this script's folder

    proc = run(*args)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        raise SystemExit(f"effc {args[0]} failed: {lines[-1]}")


def export_gpt2(seq: int, path: Path) -> None:
    from effc.ir import save
    from effc.zoo import gpt2

    gpt2.SEQ_LEN = seq  # sample_inputs and the export read the module global at call time
    save(gpt2.SPEC.build(), str(path))


def run(seq: int, bits: int, work: Path, runs: int) -> dict:
    fp32 = work / f"gpt2_s{seq}.onnx"
    if not fp32.exists():
        print(f"seq {seq}: exporting gpt2", flush=True)
        export_gpt2(seq, fp32)
    out = work / f"gpt2_s{seq}_shift_add_{bits}bit"
    if not (out / "model.so").exists():
        print(f"seq {seq}: shift-add {bits}-bit pass and llvm build (minutes)", flush=True)
        # uncalibrated lengths round to nearest (same kernels and speed), which has to be asked for
        calib = ["--calib", "zoo:gpt2"] if seq == CALIBRATED_SEQ else ["--set", "shift-add.compensate=false"]
        effc("compile", str(fp32), "--passes", "shift-add", "--bits", str(bits), *calib,
             "-o", str(out), "--target", "llvm")
    print(f"seq {seq}: bench", flush=True)
    effc("bench", str(out), "--vs", "ort", "--runs", str(runs), "--json", str(out / "bench.json"))
    result = json.loads((out / "bench.json").read_text())
    manifest = json.loads((out / "codegen.json").read_text())
    lut = sum(1 for op in manifest.get("custom_ops", []) if op.get("lowering") == "shift-add-lut")
    return {"seq": seq, "bits": bits, "lut_nodes": lut, "nodes": len(manifest.get("custom_ops", [])), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="1,128")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--work", default="/tmp/effc_bench_shift_add_gpt2")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-o", "--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [run(int(s), args.bits, work, args.runs) for s in args.seq.split(",")]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"gpt2, every block linear at shift-add {args.bits} bits, llvm, run {stamp}", "",
             "| seq | LUT nodes | effc ms median / p90 | ORT fp32 ms median / p90 | effc/ORT | effc/ORT after idle "
             "| max rel err vs ORT |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        effc_ms, ort_ms = r["effc"], r["ort"]
        lines.append(f"| {r['seq']} | {r['lut_nodes']}/{r['nodes']} | {effc_ms['median_ms']} / {effc_ms['p90_ms']} | "
                     f"{ort_ms['median_ms']} / {ort_ms['p90_ms']} | {r['ratio_vs_ort']:.3f} | "
                     f"{r['ratio_vs_ort_after_idle']:.3f} | {r['max_rel_err']:.1e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        from effc.ir import atomic_write_text

        atomic_write_text(Path(args.out), table)


if __name__ == "__main__":
    main()
