"""int8 (QDQ w8a8) side by side: effc vs ONNX Runtime vs OpenVINO on the same QDQ ONNX model.

    python tools/bench_int8.py [--models bert-base,vit-s16] [--work DIR] [--rounds 15] [--threads 2]
                               [--ops MatMul] [--baseline DIR]

The QDQ copies are made by ONNX Runtime's quantize_static (QDQ format, u8 activations, per-channel
s8 weights, MinMax on 4 calibration samples; ``--ops``: op_types_to_quantize, MatMul by default,
the maintainers' recipe for transformers), cached in the work directory, and compiled by effc
(effc.codegen.build.compile_model). Engines run interleaved (effc.codegen.bench.turns, the order rotated each round), batch 1;
medians of the steady samples are printed with the agreement of effc with ORT on the QDQ model
(max abs diff, and that diff in units of the output's quantisation step where the output has one;
cosine). ``--baseline DIR``: an earlier effc build of each model (DIR/<model>-qdq-effc, made by
another checkout) runs in the same interleaved turns as ``effc_before``, so before and after are
measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def feeds_for(model_path: str, count: int, seed: int) -> list[dict]:
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed = {}
        for value in model.graph.input:
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
                feed[value.name] = (np.ones(shape, np.int64) if "mask" in value.name
                                    else rng.integers(1000, 20000, size=shape).astype(np.int64))
            else:
                feed[value.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(feed)
    return out


def cosine(a, b) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def make_qdq(src: str, dst: Path, ops: list[str]) -> Path:
    import onnxruntime.quantization as q

    if dst.exists():
        return dst
    samples = feeds_for(src, 4, seed=1)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp.onnx")
    q.quantize_static(src, str(tmp), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      op_types_to_quantize=ops or None, calibrate_method=q.CalibrationMethod.MinMax)
    tmp.rename(dst)
    return dst


def rotated_turns(engines: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """effc.codegen.bench.turns, one round at a time with the engine order rotated each round: an
    engine right after OpenVINO ran up to 1.4x slower here (on this loaded 2-core machine), so no
    engine keeps that place."""
    from effc.codegen.bench import turns

    names = list(engines)
    steady: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        samples, _ = turns({name: engines[name] for name in order}, 1)
        if round_ >= warmup:
            for name, values in samples.items():
                steady[name].extend(values)
    return steady


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert-base,vit-s16")
    ap.add_argument("--work", default="/tmp/effc-int8-bench")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", default="MatMul")
    ap.add_argument("--make-only", action="store_true")
    ap.add_argument("--baseline", default=None, help="a directory with earlier effc builds: DIR/<model>-qdq-effc")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnx_ir as ir
    import onnxruntime as ort

    from effc.zoo.cache import cached_model_path
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled

    work = Path(args.work)
    rows = []
    for name in args.models.split(","):
        src = cached_model_path(name)
        qdq = make_qdq(str(src), work / f"{name}-qdq.onnx", [o for o in args.ops.split(",") if o])
        out = work / f"{name}-qdq-effc"
        if args.make_only:
            continue
        if not (out / "model.so").exists():
            start = time.perf_counter()
            res = compile_model(ir.load(str(qdq)), "llvm", out)
            print(f"{name}: compiled in {time.perf_counter() - start:.0f} s; {res.custom_summary}; "
                  f"rules {res.rule_hits}", flush=True)
        compiled = load_compiled(out, threads=args.threads)
        feed = feeds_for(str(qdq), 1, seed=7)[0]
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
        engines = {}
        before = Path(args.baseline) / f"{name}-qdq-effc" if args.baseline else None
        if before is not None and (before / "model.so").exists():
            earlier = load_compiled(before, threads=args.threads)
            engines["effc_before"] = lambda: earlier(feed)
        engines.update({"effc": lambda: compiled(feed), "ort": lambda: sess.run(None, feed)})
        ov_precision = None
        try:
            import openvino as ov

            core = ov.Core()
            ov_model = core.compile_model(str(qdq), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                            "PERFORMANCE_HINT": "LATENCY"})
            ov_precision = str(ov_model.get_property("INFERENCE_PRECISION_HINT"))
            request = ov_model.create_infer_request()
            engines["openvino"] = lambda: request.infer(feed)
        except Exception as exc:  # noqa: BLE001 (OpenVINO is optional)
            print(f"openvino unavailable: {exc}")
        ref = sess.run(None, feed)[0]
        got = compiled(feed)[compiled.output_names[0]]
        # ORT's own int8 rounding: its integer kernels against its plain reading of the QDQ graph
        # (optimisations off: DequantizeLinear -> float ops, exactly as written)
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        exact = ort.InferenceSession(str(qdq), plain, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        diff = float(np.abs(got - ref).max())
        cos = cosine(got, ref)
        own = {"ort_int8_vs_qdq_float": {"max_abs": float(np.abs(ref - exact).max()), "cosine": cosine(ref, exact)},
               "effc_vs_qdq_float": {"max_abs": float(np.abs(got - exact).max()), "cosine": cosine(got, exact)}}
        steady = rotated_turns(engines, args.rounds, warmup=2)
        med = {k: float(np.median(v) * 1e3) for k, v in steady.items()}
        row = {"model": name, "ms": med, "ov_precision": ov_precision, "max_abs_diff_vs_ort": diff,
               "cosine_vs_ort": cos, **own, "min_ms": {k: float(np.min(v) * 1e3) for k, v in steady.items()},
               "ort_over_effc": med["ort"] / med["effc"],
               "ov_over_effc": med.get("openvino", float("nan")) / med["effc"],
               "before_over_effc": med.get("effc_before", float("nan")) / med["effc"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
