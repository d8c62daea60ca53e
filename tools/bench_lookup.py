"""Speed of effc's lookup kernels (effc.LookupLinear) against a dense fp32 linear of the same shape.

    python tools/bench_lookup.py [--n 3072] [--k 768] [--v 16] [--encoder pq|hash] [--m 128,1] [--threads 2]

One run, side by side, same thread count, per M: a K -> N linear replaced by product-quantized
lookups (16 codes per v-dim chunk, int8 tables with a scale per table), compiled by `effc compile`
for llvm (the node lowers to effc.kernels.lookup_cpu: the vpshufb kernel at M >= 16, the plain
kernel below); ONNX Runtime's fp32 MatMul + Add of the same shape; and effc's own fp32 matmul rule
on that MatMul + Add model (compiled by effc likewise). Each compiled module runs through its
Relax VM as `effc bench` runs it (inputs prepared once). Timings are medians of per-call times,
the engines interleaved round by round (a load spike hits all), each turn after an idle gap and a
warm-up, ONNX Runtime's workers told to stop spinning when a run returns (as `effc bench` does).
The lookup model is also checked against ONNX Runtime running the op's function (max relative
deviation printed). Values are random: the speed depends on shapes only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def lookup_model(m: int, k: int, n: int, v: int, rng, encoder: str = "pq"):
    """x [m, k] -> effc.LookupLinear (pq: 16 codes per v-dim chunk; hash: 2^v codes), int8 tables."""
    import onnx_ir as ir

    from effc.ops import DOMAIN, use
    from effc.ops import lookup_linear as op

    chunks, codes = k // v, 16 if encoder == "pq" else 2 ** v
    const = rng.standard_normal((chunks, codes, v) if encoder == "pq" else (chunks, v)).astype(np.float32)
    arrays = (const, rng.integers(-128, 128, size=(chunks, codes, n)).astype(np.int8),
              rng.uniform(0.001, 0.01, chunks).astype(np.float32), rng.standard_normal(n).astype(np.float32))
    x = ir.Value(name="x", shape=ir.Shape([m, k]), type=ir.TensorType(ir.DataType.FLOAT))
    consts = [ir.Value(name=name, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                       const_value=ir.tensor(a, name=name))
              for name, a in zip(("encoder_const", "tables", "table_scale", "bias"), arrays)]
    node = ir.Node(DOMAIN, op.NAME, [x, *consts], num_outputs=1, name="lookup",
                   attributes=[ir.AttrString("encoder", encoder), ir.AttrInt64("v", v), ir.AttrInt64("soft", 0)])
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([m, n])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=consts, opset_imports={"": 17}, name="lookup")
    model = ir.Model(graph, ir_version=10)
    use(model, op.function(17))
    return model


def dense_model(m: int, k: int, n: int, rng):
    """x [m, k] -> MatMul (fp32 weight [k, n]) + Add (bias)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from effc.frontend.onnx import from_proto

    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return from_proto(proto)


def ort_session(model, threads: int):
    import onnxruntime as ort

    from effc.codegen.bench import ORT_CONFIG
    from effc.ir import to_proto

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    for key, value in ORT_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def compiled_runner(model, out: Path, threads: int):
    """``model`` built by effc for the host CPU into ``out``, loaded."""
    from effc.codegen.build import compile_model, load_compiled
    from effc.codegen.target import llvm_target

    compile_model(model, llvm_target(threads), out)
    return load_compiled(out, threads)


def per_call_ms(fn, calls: int) -> float:
    """Median wall-clock ms of ``calls`` back-to-back calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def bench_m(m: int, args, work: Path, rng) -> str:
    from effc.codegen.bench import _effc_runner, turns
    from effc.verify import OrtRunner, deviation

    k, n, v = args.k, args.n, args.v
    x = rng.standard_normal((m, k)).astype(np.float32)
    lookup, dense = lookup_model(m, k, n, v, rng, args.encoder), dense_model(m, k, n, rng)
    lut = compiled_runner(lookup, work / f"lookup_m{m}", args.threads)
    kernel = lut.manifest["custom_ops"][0]["kernel"]
    mm = compiled_runner(dense, work / f"dense_m{m}", args.threads)
    err = deviation([lut({"x": x})], OrtRunner(lookup).run_all([{"x": x}])).max_rel
    session = ort_session(dense, args.threads)
    run_lut, run_mm = _effc_runner(lut, {"x": x}), _effc_runner(mm, {"x": x})
    calls = 50 if m < 16 else 5
    engines = {"lookup": lambda: per_call_ms(run_lut, calls),
               "ort": lambda: per_call_ms(lambda: session.run(None, {"x": x}), calls),
               "effc_fp32": lambda: per_call_ms(run_mm, calls)}
    for fn in engines.values():  # warm-up: thread pools started, caches filled
        fn()
    steady, _ = turns(engines, rounds=args.rounds, warmup=2, measure=lambda timed: timed())
    t = {name: float(np.median(samples)) for name, samples in steady.items()}
    return (f"| {m} | {t['lookup']:.3f} | {t['ort']:.3f} | {t['effc_fp32']:.3f} | {t['ort'] / t['lookup']:.2f}x | "
            f"{t['effc_fp32'] / t['lookup']:.2f}x | {kernel.rsplit('_m', 1)[0]} | {err:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--v", type=int, default=16)
    parser.add_argument("--encoder", choices=("pq", "hash"), default="pq")
    parser.add_argument("--m", default="128,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    rng = np.random.default_rng(0)
    codes = 16 if args.encoder == "pq" else 2 ** args.v
    print(f"{args.k} -> {args.n} linear; lookup: {args.encoder}, {codes} codes per {args.v}-dim chunk "
          f"({args.k // args.v} chunks), "
          f"int8 tables; {args.threads} threads; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| M | effc lookup ms | ORT fp32 MatMul ms | effc fp32 matmul ms | vs ORT | vs effc fp32 | kernel | "
          "max rel dev vs ORT (op function) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in (int(v) for v in args.m.split(",")):
            print(bench_m(m, args, Path(tmp), rng), flush=True)


if __name__ == "__main__":
    main()
