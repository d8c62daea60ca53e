"""Compile conv networks with effc for llvm and time them against ONNX Runtime side by side.

    python tools/bench_convnets.py [--models resnet18,audio-stem] [--work DIR] [--runs 15] [--repeat 2]
                                   [--threads 2] [--profile] [--cpu-time]
                                   [--precisions fp32,bf16,int8 [--out docs/convnets.md]]

resnet18: transformers' ResNetModel with a ResNet-18 configuration (basic blocks, depths 2-2-2-2),
random init, exported by torch.onnx.export with its default settings at [1, 3, 224, 224].
audio-stem: Whisper's encoder stem (Conv1d k3 s1 + GELU, Conv1d k3 s2 + GELU) on 80 x 3000 mel frames.
Each model is exported and compiled once per work directory (`effc compile --passes none --target
llvm`); `effc bench` (effc/codegen/bench.py: interleaved engines, ORT not spinning between runs) is
run --repeat times, since the machine may be shared; --profile adds `effc bench --profile`'s table
and a per-layer table (layer_table); --cpu-time compares one-thread CPU time instead (cpu_time_table,
and per layer with --profile), which other load on a shared machine barely moves.
--precisions writes one table instead (precision_table, docs/convnets.md): ORT fp32, OpenVINO f32
and default, effc fp32, and per precision asked effc bf16 (`--precision bf16`) and the int8
columns (ORT, OpenVINO and `effc compile` on a quantize_static QDQ copy), in one interleaved run per
model, by tools/bench_precisions.py's engines, QDQ copy and table (with --cpu-time: one thread, CPU time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = ("resnet18", "audio-stem")
NOTES = "## Notes"  # the --precisions page keeps what follows this heading when it is rewritten


def resnet18():
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                          embedding_size=64)
    return ResNetModel(config), (1, 3, 224, 224)


def audio_stem():
    import torch
    from torch import nn

    class Stem(nn.Module):  # as WhisperEncoder's conv1 / conv2
        def __init__(self, mels: int = 80, width: int = 384):
            super().__init__()
            self.conv1 = nn.Conv1d(mels, width, kernel_size=3, padding=1)
            self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)

        def forward(self, x):
            return nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(x))))

    torch.manual_seed(0)
    return Stem(), (1, 80, 3000)


BUILDERS = {"resnet18": resnet18, "audio-stem": audio_stem}


def export(name: str, path: Path) -> None:
    import torch

    torch.manual_seed(0)
    module, shape = BUILDERS[name]()
    torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path))


def _median(values):
    import numpy as np

    return float(np.median(values))


def layer_models(onnx_path: Path) -> list[tuple[str, int, object]]:
    """(label, count, single-layer model) for every distinct Conv (+ its Relu) and pool of the model,
    with the shapes and attributes it has there."""
    import onnx
    from onnx import helper

    from effc.frontend.onnx import from_proto

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    inits = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers: dict[str, list] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "MaxPool", "AveragePool"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights = [inits[n] for n in node.input[1:] if n]
        relu = [c for c in consumers.get(node.output[0], []) if c.op_type == "Relu"]
        label = (f"{node.op_type} {shapes[node.input[0]]} -> {shapes[node.output[0]]} "
                 f"k{attrs.get('kernel_shape')} s{attrs.get('strides')}{' +relu' if relu else ''}")
        if label in layers:
            layers[label][0] += 1
            continue
        nodes = [helper.make_node(node.op_type, ["x", *[w.name for w in weights]], ["c" if relu else "y"], **attrs)]
        if relu:
            nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        value = lambda name, shape: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)  # noqa: E731
        graph = helper.make_graph(nodes, "layer", [value("x", shapes[node.input[0]])],
                                  [value("y", shapes[node.output[0]])], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        layers[label] = [1, from_proto(model)]
    return [(label, count, model) for label, (count, model) in layers.items()]


def cpu_seconds(fn) -> float:
    """CPU time of ``fn()`` over all of this process's threads (other processes' load barely moves it)."""
    import time

    start = time.process_time()
    fn()
    return time.process_time() - start


def layer_table(onnx_path: Path, work: Path, threads: int, rounds: int, cpu_time: bool = False) -> str:
    """Every distinct conv/pool layer compiled alone and timed against ONNX Runtime on the same layer,
    interleaved (bench.turns, steady-state medians, and the ratio of the fastest runs): a per-kernel
    comparison that the shared machine's noise does not swamp, as one instrumented whole-model run
    does. A layer's effc time includes its im2col and the reshape copying the result out."""
    import numpy as np

    from effc.codegen.bench import ORT_CONFIG, turns
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import configure_threads, load_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    configure_threads(threads)
    lines = [f"{'layer':78s} {'x':>2s} {'effc ms':>8s} {'ORT ms':>8s} {'ratio':>6s} {'min ratio':>9s}  rules"]
    for i, (label, count, model) in enumerate(layer_models(onnx_path)):
        out = work / f"layer{i}"
        result = compile_model(model, "llvm", out)
        compiled = load_compiled(out, threads)
        feed = make_inputs(model, 1, seed=0)[0]
        ort = OrtRunner(model, threads=threads, config=ORT_CONFIG)
        err = deviation([compiled(feed)], [ort(feed)]).max_rel
        args, main, params = compiled.args(feed), compiled.vm["main"], compiled.params
        steady, _ = turns({"effc": lambda: main(*args, *params), "ort": lambda: ort(feed)}, rounds, 3, 0.05, 5,
                          **({"measure": cpu_seconds} if cpu_time else {}))
        effc_ms, ort_ms = (float(np.median(steady[k])) * 1e3 for k in ("effc", "ort"))
        fastest = float(np.min(steady["effc"]) / np.min(steady["ort"]))  # least disturbed by other load
        rules = ",".join(sorted(set(result.kernels.values())))
        lines.append(f"{label[:78]:78s} {count:2d} {effc_ms:8.3f} {ort_ms:8.3f} {effc_ms / ort_ms:6.2f} "
                     f"{fastest:9.2f}  {rules}"
                     f"{'' if err < 1e-4 else f'  MAX REL ERR {err:.1e}'}")
    return "\n".join(lines)


def cpu_time_table(onnx_path: Path, out: Path, rounds: int) -> str:
    """effc and ONNX Runtime on one thread each, interleaved, timed by the process's CPU time: what
    other load on a shared machine barely moves (wall time under contention swung 5x here)."""
    import numpy as np

    from effc.codegen.bench import ORT_CONFIG, turns
    from effc.codegen.runtime import configure_threads, load_compiled
    from effc.frontend.onnx import load
    from effc.verify import OrtRunner, make_inputs

    configure_threads(1)  # this process's TVM pool (bench_convnets runs `effc bench` in subprocesses)
    feed = make_inputs(load(onnx_path), 1)[0]
    compiled = load_compiled(out, 1)
    args, main, params = compiled.args(feed), compiled.vm["main"], compiled.params
    ort = OrtRunner(onnx_path, threads=1, config=ORT_CONFIG)
    steady, _ = turns({"effc": lambda: main(*args, *params), "ort": lambda: ort(feed)}, rounds, 2, 0.05, 3,
                      measure=cpu_seconds)
    effc_ms, ort_ms = (float(np.median(steady[k])) * 1e3 for k in ("effc", "ort"))
    return f"1 thread, CPU time: effc {effc_ms:.2f} ms, ORT {ort_ms:.2f} ms, effc/ORT {effc_ms / ort_ms:.3f}"


PRECISION_COLUMNS = {"bf16": ("effc bf16",), "int8": ("ORT int8 (QDQ)", "OpenVINO int8 (QDQ)", "effc int8 (QDQ)")}


def precision_rows(names: list[str], work: Path, precisions: set[str], threads: int, runs: int,
                   measure=None) -> list[dict]:
    """bench_precisions' rows for the ONNX files ``work``/NAME.onnx: the same engines and table,
    seeded random inputs (seed 0 the bench feed, seed 1 the QDQ copy's calibration), effc compiled
    as bench_convnets compiles (`--passes none`). Columns of precisions not asked say so."""
    import gc

    import bench_precisions as bp

    from effc.frontend.onnx import load
    from effc.verify import make_inputs

    offered = bp.effc_precisions() & precisions
    rows = []
    for name in names:
        print(f"{name}:", flush=True)
        onnx_path = work / f"{name}.onnx"
        model = load(onnx_path)
        row = bp.bench_model(name, work, threads, runs, 2, offered, feed=make_inputs(model, 1, seed=0)[0],
                             model=onnx_path, samples=lambda m=model: make_inputs(m, bp.CALIBRATION, seed=1),
                             flags=("--passes", "none"), int8="int8" in precisions, measure=measure)
        for precision, columns in PRECISION_COLUMNS.items():
            if precision not in precisions:
                row["missing"].update({c: "not asked" for c in columns})
        rows.append(row)
        gc.collect()
    return rows


def precision_page(rows: list[dict], started: str, load_before: str, load_after: str, threads: int,
                   runs: int, cpu_time: bool = False) -> str:
    import onnxruntime
    import openvino

    import bench_precisions as bp

    latency, accuracy = bp.markdown(rows)
    default_precision = sorted({r["precision"].get("OpenVINO default") for r in rows} - {None})
    return "\n".join([
        "# Conv networks at every precision: effc beside ONNX Runtime and OpenVINO (CPU)", "",
        f"Run {started} by `python tools/bench_convnets.py --precisions ...{' --cpu-time' if cpu_time else ''}` on "
        f"{bp.cpu_line()}; {threads} thread(s) for every engine, batch 1, "
        f"{'timed by the process CPU time of each call (other load barely moves it)' if cpu_time else 'wall time'}. "
        f"ONNX Runtime {onnxruntime.__version__}, OpenVINO "
        f"{openvino.__version__.split('-')[0]}. Models: {', '.join(r['model'] for r in rows)} "
        "(tools/bench_convnets.py: random init, torch.onnx.export defaults; effc `--passes none`).", "",
        f"Machine load (`uptime`) before: `{load_before}`", f"after: `{load_after}`", "",
        ("**This machine is shared**: read the ratios, from one interleaved run per model (every engine "
         f"takes its turn in every round after an idle gap; 2 warm-up rounds dropped, then the median of {runs} "
         f"rounds x 3 back-to-back calls; effc/codegen/bench.py)."
         f"{'' if cpu_time else bp._overload_note(load_before, load_after)}"), "",
        (f"Columns: OpenVINO default = the precision it picks here (it reported {', '.join(default_precision) or '?'}); "
         "effc bf16 = `effc compile --precision bf16` (conv GEMMs and matmuls on bf16 operands, fp32 "
         "accumulation; a stem with a few input channels and depthwise convs stay fp32); int8 (QDQ) = a copy "
         f"made by ONNX Runtime's `quantize_static` (QDQ, u8 activations, per-channel s8 weights, MinMax over "
         f"{bp.CALIBRATION} seeded random inputs), run as is by each engine, effc's column by `effc compile` of it."), "",
        "## Latency relative to ONNX Runtime fp32 (lower is faster)", "", latency,
        "## Deviation from ONNX Runtime fp32 on the bench feed (max scale-relative error / cosine)", "", accuracy])


def effc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc.cli", *args], capture_output=True, text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--work", default="/tmp/effc-convnets")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="instead of `effc bench`: 1-thread CPU time (cpu_time_table; "
                        "with --profile, per layer too)")
    parser.add_argument("--precisions", help="comma-separated fp32,bf16,int8: write the table of engines x "
                        "these precisions to --out instead (precision_table)")
    parser.add_argument("--out", default="docs/convnets.md", help="the --precisions table's page")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    for name in names:
        if not (work / f"{name}.onnx").exists():
            export(name, work / f"{name}.onnx")
    if args.precisions:
        return precision_table(names, work, args)
    for name in names:
        onnx_path, out = work / f"{name}.onnx", work / name
        if not (out / "model.so").exists():
            proc = effc("compile", str(onnx_path), "-o", str(out), "--passes", "none", "--target", "llvm")
            if proc.returncode != 0:
                print(f"{name}: compile failed: {proc.stderr.strip()[-300:]}")
                continue
        rules = json.loads((out / "codegen.json").read_text())["rule_hits"]
        print(f"## {name}  (kernels by rule: {rules})")
        if args.cpu_time:  # one thread throughout: configure_threads sizes TVM's pool once per process
            print(cpu_time_table(onnx_path, out, args.runs), flush=True)
            if args.profile:
                print(layer_table(onnx_path, work / f"{name}-layers", 1, args.runs, cpu_time=True), flush=True)
            continue
        for i in range(args.repeat):
            bench = ["bench", str(out), "--runs", str(args.runs), "--threads", str(args.threads),
                     "--json", str(out / f"bench{i}.json")]
            proc = effc(*bench, *(["--profile", "--top", "25"] if args.profile and i == args.repeat - 1 else []))
            if proc.returncode != 0:
                print(f"{name}: bench failed: {proc.stderr.strip()[-300:]}")
                break
            r = json.loads((out / f"bench{i}.json").read_text())
            print(f"run {i}: effc {r['effc']['median_ms']:.2f} ms, ORT {r['ort']['median_ms']:.2f} ms, "
                  f"effc/ORT {r['ratio_vs_ort']:.3f} (after idle {r['ratio_vs_ort_after_idle']:.3f}), "
                  f"max rel err {r['max_rel_err']:.2e}", flush=True)
            if args.profile and i == args.repeat - 1:
                print(proc.stdout)
                print(layer_table(onnx_path, work / f"{name}-layers", args.threads, args.runs))

    return 0


def precision_table(names: list[str], work: Path, args) -> int:
    import datetime

    import bench_precisions as bp

    from effc.codegen.runtime import configure_threads

    precisions = set(args.precisions.split(","))
    unknown = precisions - {"fp32", "bf16", "int8"}
    if unknown:
        print(f"unknown precision(s): {', '.join(sorted(unknown))} (known: fp32, bf16, int8)", file=sys.stderr)
        return 2
    threads = 1 if args.cpu_time else args.threads  # --cpu-time: one thread, as cpu_time_table
    configure_threads(threads)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = bp.uptime()
    rows = precision_rows(names, work, precisions, threads, args.runs, cpu_seconds if args.cpu_time else None)
    text = precision_page(rows, started, load_before, bp.uptime(), threads, args.runs, args.cpu_time)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and NOTES in out.read_text():  # the page's hand-written notes survive a rerun
        text = text.rstrip("\n") + "\n\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.write_text(text)
    (work / "precisions.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
