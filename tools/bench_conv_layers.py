"""Time one conv layer (Conv k x k, pad k // 2, + bias + Relu, as a ResNet's) in effc fp32, ONNX
Runtime and OpenVINO f32: one thread, process CPU time per call, interleaved rounds, medians.

    python tools/bench_conv_layers.py [--shapes 64x56,128x28,256x14,512x7] [--kernel 3] [--batch 1]
                                      [--work /tmp/conv-layers] [--rounds 9]

A shape CxS is C input and output channels on an S x S image (CxSx1: a conv1d on S frames). Each
effc output is checked against ONNX Runtime (1e-4 scale-relative) before it is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(fn, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def layer_engines(c: int, size: int, dims: int, kernel: int, batch: int, work: Path) -> dict:
    """name -> zero-argument call, for one layer's model (effc checked against ORT first)."""
    import onnx_ir as ir

    from effc.codegen.bench import _effc_runner
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled
    from effc.verify import OrtRunner, deviation, make_inputs
    from tests.codegen.test_conv_rule import _conv_model

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_bf16 import openvino_engines

    model = _conv_model(batch, c, size, c, kernel, 1, kernel // 2, 1, 1, dims=dims)
    feeds = make_inputs(model, 1, seed=3)
    ort = OrtRunner(model, threads=1)
    out = work / f"{c}x{size}x{dims}d-k{kernel}-n{batch}"
    compile_model(model, "llvm", out)
    compiled = load_compiled(out, 1)
    dev = deviation([compiled(f) for f in feeds], ort.run_all(feeds))
    if dev.max_rel >= 1e-4:
        raise SystemExit(f"effc disagrees with ORT on {out.name}: {dev}")
    engines = {"ort": lambda: ort.run_all(feeds), "effc": _effc_runner(compiled, feeds[0])}
    ir.save(model, str(out / "layer.onnx"))
    for label, (run, _, _) in openvino_engines(out / "layer.onnx", 1, feeds[0]).items():
        if label == "openvino_f32":
            engines[label] = run
    return engines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x56,128x28,256x14,512x7")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/conv-layers"))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    from effc.codegen.runtime import configure_threads

    configure_threads(1)
    print("| layer | ORT ms | OpenVINO f32 ms | effc fp32 ms | effc / ORT |\n|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        c, size, *dims = (int(v) for v in shape.split("x"))
        engines = layer_engines(c, size, dims[0] if dims else 2, args.kernel, args.batch, args.work)
        calls = max(1, int(50 / max(cpu_ms(engines["ort"], 1), 0.1)))  # about 50 ms per turn
        times = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, run in engines.items():
                times[name].append(cpu_ms(run, calls))
        med = {name: statistics.median(t[2:]) for name, t in times.items()}  # 2 warm-up rounds dropped
        ov = f"{med['openvino_f32']:.2f}" if "openvino_f32" in med else "-"
        print(f"| {shape} | {med['ort']:.2f} | {ov} | {med['effc']:.2f} | {med['effc'] / med['ort']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
