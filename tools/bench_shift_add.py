"""Speed of the CPU lookup-table kernel for effc.ShiftAddMatMul against ONNX Runtime fp32 MatMul.

    python tools/bench_shift_add.py [--n 4096] [--k 4096] [--bits 3] [--m 1,128] [--threads 2]

One run, side by side, same thread count: a random N x K weight quantized by the shift-add
layout (group 8, one power-of-two term per scale), the TVM kernel (effc.kernels.shift_add_cpu)
and ONNX Runtime's fp32 MatMul on the dense weight it stands for. Timings are medians after
warm-up, the two interleaved round by round so that a loaded machine slows both alike, each turn
after an idle gap, with ONNX Runtime's workers told to stop spinning when a run returns (as `effc
bench` does: a spinning pool would take one of the two cores from the other engine). The calls
right after the gap are reported apart ("after idle": a core that idled comes back slow here);
the headline is the median of the three back-to-back timings that follow each; agreement
is checked against the op's numpy reference (effc.ops.shift_add_matmul). M >= 16 runs the
prefill kernel (effc.kernels.shift_add_prefill), smaller M the decode kernel.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from effc.codegen.bench import ORT_CONFIG, turns


def random_layer(rng, q: int, n: int, k: int, group: int = 8):
    """(planes, codes, bias) of a random shift-add linear: one power-of-two term per scale."""
    from effc.ops import shift_add_matmul as op

    planes = op.pack_planes(rng.choice([-1, 1], size=(q, n, k)))
    exps = -6 - np.arange(q)[:, None, None, None] + rng.integers(-1, 2, size=(q, n, k // group, 1))
    codes = op.encode_terms(rng.choice([-1, 1], size=exps.shape), exps)
    return planes, codes, rng.standard_normal(n).astype(np.float32)


def layer_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line of a shift-add kernel benchmark: the layer (N x K, bits) and the rows M."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--m", default="1,128")
    return parser


def ort_matmul(weight_t: np.ndarray, bias: np.ndarray, threads: int):
    """An ONNX Runtime session computing x @ weight_t + bias in fp32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight_t.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight_t, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    for key, value in ORT_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
                                options, providers=["CPUExecutionProvider"])


def median_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = layer_arguments(__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    from effc.kernels.shift_add_cpu import ShiftAddKernel
    from effc.ops import shift_add_matmul as op

    rng = np.random.default_rng(0)
    q, n, k, group = args.bits, args.n, args.k, 8
    planes, codes, bias = random_layer(rng, q, n, k, group)
    session = ort_matmul(op.dense_weight(planes, codes).T.astype(np.float32).copy(), bias, args.threads)
    bits = (planes.size + codes.size) * 8 / (n * k)
    print(f"{n}x{k} linear, {q} planes + 1 scale byte per plane and group of {group} ({bits:.2f} bits/weight), "
          f"{args.threads} threads")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| M | shift-add LUT (TVM) ms | ORT fp32 MatMul ms | speed-up | after idle: LUT / ORT ms | "
          "max rel err vs reference |")
    print("|---|---|---|---|---|---|")
    for m in (int(v) for v in args.m.split(",")):
        kernel = ShiftAddKernel(planes, codes, bias, m)
        x = rng.standard_normal((m, k)).astype(np.float32)
        reference = op.reference(x.astype(np.float64), planes, codes, bias)
        error = float(np.abs(kernel(x) - reference).max() / np.abs(reference).max())
        number = 20 if m == 1 else 2
        engines = {"lut": lambda x=x: kernel.time_ms(x, number=number, repeat=1),
                   "ort": lambda x=x: median_ms(lambda: session.run(None, {"x": x}), warmup=1, repeat=number)}
        # interleaved rounds (load spikes hit both sides), each engine's turn as in `effc bench`;
        # the engines time themselves (ms per call)
        steady, idle = turns(engines, rounds=15, measure=lambda timed: timed())
        lut, ort = (float(np.median(steady[name])) for name in engines)
        lut_idle, ort_idle = (float(np.median(idle[name])) for name in engines)
        print(f"| {m} | {lut:.3f} | {ort:.3f} | {ort / lut:.2f}x | {lut_idle:.3f} / {ort_idle:.3f} | {error:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
