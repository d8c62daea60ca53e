"""Acceptance table of issue 13: effc's quantize pass against ONNX Runtime's own quantization tool.

    python tools/quantize_accuracy.py [--models minilm-l6,vit-digits,gpt-text,bert-base,gpt2]
                                      [--side ort|effc|both] [--results docs/quantization.json]
                                      [--render docs/quantization.md]

Every method of a model gets the same calibration feeds (the zoo's calibration set, effc.calib.zoo_calibration:
training data, for vit-digits validation data, never the metric's) and is scored on the zoo's held-out data by
the zoo's own metric (``module.evaluate``, the same as ``effc eval``): minilm-l6 embedding cosine to the fp32
torch embeddings, vit-digits top-1, gpt-text perplexity per byte, bert-base / gpt2 (random weights) output
cosine to fp32 torch.

ONNX Runtime's side (onnxruntime.quantization, the version installed):
- w8a8: ``quantize_static``, QDQ format, uint8 activations (asymmetric, per tensor), int8 weights per channel
  (symmetric), with MinMax, Entropy and Percentile calibration over a CalibrationDataReader of the same feeds.
  ``ort-*`` rows quantize MatMul/Gemm only (the maintainers' advice for transformers: norms, GELU, residual
  and pre-Softmax Adds stay float); the ``ort-minmax-all-ops`` row is the tool's default op selection.
- w4: ``MatMulNBitsQuantizer`` block 128, RTN (its default config, asymmetric; and symmetric) and GPTQ.
effc's side: ``effc compile zoo:NAME --passes quantize --set ... --calib <the same feeds as .npz>``.

Results accumulate in a JSON file keyed by (model, method), so the two sides can be run separately; --render
writes the markdown table from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from effc import zoo
from effc.calib import save_npz, zoo_calibration
from effc.verify import OrtRunner
from effc.zoo.cache import cached_model_path

ROOT = Path(__file__).resolve().parent.parent

# model -> (mode, calibration sample count; None: the zoo's default set)
MODELS: dict[str, tuple[str, int | None]] = {
    "minilm-l6": ("w8a8", None),   # every calibration sentence (238)
    "vit-digits": ("w8a8", 64),
    "gpt-text": ("w4", 64),
    # ORT's histogram calibrators (Entropy, Percentile) keep every activation of every sample in memory:
    # with 32 samples its Entropy run on gpt2 passed 12 GB (the machine has 23 GB), so gpt2 gets 16.
    "bert-base": ("w8a8", 32),
    "gpt2": ("w8a8", 16),
}

# (calibration method, op types (None: the tool's default), extra_options)
ORT_W8A8 = {
    "ort-minmax": ("MinMax", ["MatMul", "Gemm"], {}),
    # The tool's default Entropy histogram has 128 bins for 128 quantized bins: its KL search then has
    # a single candidate, the full range, so it equals MinMax. 2048 bins give the search room.
    "ort-entropy": ("Entropy", ["MatMul", "Gemm"], {}),
    "ort-entropy-2048": ("Entropy", ["MatMul", "Gemm"], {"CalibNumBins": 2048}),
    "ort-percentile": ("Percentile", ["MatMul", "Gemm"], {}),
    "ort-minmax-all-ops": ("MinMax", None, {}),
    # only the linears (MatMul/Gemm with a constant weight), as effc: not the attention's activation x
    # activation MatMuls, which "MatMul" op types include
    "ort-percentile-linears": ("Percentile", "linears", {}),
}
# GPTQ asymmetric fails in ORT 1.32 when a weight has one block per column (K == block): its zero points
# are packed two per byte and then reshaped to one row per column; the symmetric variant has none.
ORT_W4 = ("ort-rtn-asym", "ort-rtn-sym", "ort-gptq-sym", "ort-gptq-asym")

# effc rows: method -> --set options (the pass's option names; see effc/passes/quantize.py)
EFFC_W8A8 = {
    "effc-minmax": ["quantize.mode=w8a8", "quantize.calibrate=minmax"],
    "effc-percentile": ["quantize.mode=w8a8", "quantize.calibrate=percentile"],
    "effc-entropy": ["quantize.mode=w8a8", "quantize.calibrate=entropy"],
    "effc-entropy-sq0.5": ["quantize.mode=w8a8", "quantize.calibrate=entropy", "quantize.smoothquant_alpha=0.5"],
    "effc-percentile-sq0.5": ["quantize.mode=w8a8", "quantize.calibrate=percentile",
                              "quantize.smoothquant_alpha=0.5"],
}
EFFC_W4 = {
    "effc-rtn": ["quantize.mode=w4", "quantize.block=128", "quantize.gptq=false"],
    "effc-gptq": ["quantize.mode=w4", "quantize.block=128", "quantize.gptq=true"],
    # also the LM head (tied to the embedding), which effc keeps float by default: ORT's tool quantizes it
    "effc-rtn-ends": ["quantize.mode=w4", "quantize.block=128", "quantize.gptq=false", "quantize.ends=true"],
    "effc-gptq-ends": ["quantize.mode=w4", "quantize.block=128", "quantize.gptq=true", "quantize.ends=true"],
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts (only the model's inputs)."""

    def __init__(self, feeds, input_names):
        self.feeds, self.input_names = feeds, set(input_names)
        self.rewind()

    def get_next(self):
        feed = next(self._it, None)
        return None if feed is None else {k: v for k, v in feed.items() if k in self.input_names}

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):  # MatMulNBitsQuantizer's GPTQ iterates a deep copy of the reader
        self.rewind()
        return iter(self.get_next, None)

    def __deepcopy__(self, memo):
        return FeedReader(self.feeds, self.input_names)


def model_inputs(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def constant_weight_linears(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def ort_w8a8(src: Path, dst: Path, feeds, method: str, op_types, extra: dict) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = None
    if op_types == "linears":
        nodes, op_types = constant_weight_linears(src), ["MatMul", "Gemm"]
    quantize_static(str(src), str(dst), FeedReader(feeds, model_inputs(src)), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types, nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                    # not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMax drops the outputs collected
                    # when that count is reached instead of merging their ranges ("No data is collected.")
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, **extra})


def ort_w4(src: Path, dst: Path, feeds, method: str) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(src))
    symmetric = method.endswith("-sym")
    if method.startswith("ort-gptq"):
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=FeedReader(feeds, model_inputs(src)),
                                           block_size=128)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=symmetric)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=symmetric, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def effc_compile(name: str, calib_npz: Path, settings: list[str], out: Path) -> Path:
    cmd = [sys.executable, "-m", "effc.cli", "compile", f"zoo:{name}", "--passes", "quantize", "--calib",
           str(calib_npz), "-o", str(out)]
    for s in settings:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"effc compile exit {done.returncode}: {tail[-1] if tail else ''}")
    return out / "model.onnx"


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run_model(name: str, side: str, methods: set[str] | None, results: dict, threads: int, save) -> None:
    module = zoo.get(name)
    mode, count = MODELS[name]
    src = cached_model_path(name)
    feeds = zoo_calibration(name, count)
    key_fp32 = f"{name}/fp32"
    if key_fp32 not in results:
        metric, value = module.evaluate(OrtRunner(src, threads=threads))
        results[key_fp32] = dict(model=name, method="fp32", tool="-", mode="fp32", metric=metric, value=value)
        save()
    fp32 = results[key_fp32]
    log(f"{name}: fp32 {fp32['metric']} {fp32['value']:.5f}; {len(feeds)} calibration samples")
    if side in ("ort", "both"):
        todo = list(ORT_W8A8) if mode == "w8a8" else list(ORT_W4)
    else:
        todo = []
    if side in ("effc", "both"):
        todo += list(EFFC_W8A8 if mode == "w8a8" else EFFC_W4)
    with tempfile.TemporaryDirectory(prefix="qacc-") as tmp:
        calib_npz = save_npz(feeds, Path(tmp) / "calib.npz")
        for method in todo:
            if methods and method not in methods:
                continue
            dst = Path(tmp) / method / "model.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            row = dict(model=name, method=method, mode=mode, metric=fp32["metric"], calibration=len(feeds),
                       tool="effc" if method.startswith("effc") else "onnxruntime")
            start = time.perf_counter()
            try:
                if method in ORT_W8A8:
                    ort_w8a8(src, dst, feeds, *ORT_W8A8[method])
                elif method in ORT_W4:
                    ort_w4(src, dst, feeds, method)
                else:
                    settings = (EFFC_W8A8 if mode == "w8a8" else EFFC_W4)[method]
                    row["settings"] = settings
                    dst = effc_compile(name, calib_npz, settings, dst.parent / "out")
                row["seconds"] = round(time.perf_counter() - start, 1)
                counts = op_counts(dst)
                row["ops"] = {k: v for k, v in counts.items()
                              if k in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits", "QLinearMatMul",
                                       "MatMulInteger", "DynamicQuantizeLinear")}
                _, row["value"] = module.evaluate(OrtRunner(dst, threads=threads))
                log(f"  {method:22s} {fp32['metric']} {row['value']:.5f}  (quantized in {row['seconds']:.0f} s)")
            except Exception as exc:  # noqa: BLE001 (a failing method is a row of the table, not the end)
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                log(f"  {method:22s} FAILED {row['error']}")
            results[f"{name}/{method}"] = row
            save()


def render(results: dict, machine: str) -> str:
    lines = ["| model | mode | metric | fp32 | tool | method | calib samples | value | value - fp32 | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        fp32 = results.get(f"{name}/fp32")
        if not fp32:
            continue
        for key, row in results.items():
            if row["model"] != name or row["method"] == "fp32":
                continue
            value = f"{row['value']:.4f}" if "value" in row else f"failed: {row.get('error', '?')}"
            delta = f"{row['value'] - fp32['value']:+.4f}" if "value" in row else ""
            lines.append(f"| {name} | {row['mode']} | {fp32['metric']} | {fp32['value']:.4f} | {row['tool']} | "
                         f"{row['method']} | {row.get('calibration', '')} | {value} | {delta} | "
                         f"{row.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} threads, onnxruntime {onnxruntime.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--side", choices=("ort", "effc", "both"), default="both")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads for the metric")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "quantization.json")
    parser.add_argument("--render", type=Path, default=None, help="print the table; with a path, also write it")
    parser.add_argument("--no-run", action="store_true", help="only render the results file")
    args = parser.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else {}

    def save() -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")

    if not args.no_run:
        methods = set(filter(None, args.methods.split(",")))
        for name in filter(None, args.models.split(",")):
            run_model(name.strip(), args.side, methods, results, args.threads, save)
    table = render(results, machine_line())
    print(table)
    if args.render:
        args.render.write_text(table)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
