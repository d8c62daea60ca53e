"""Speed of the CUDA lookup-table kernel for effc.ShiftAddMatMul against torch's dense matmul on the
same GPU (a GPU needed).

    python tools/bench_shift_add_cuda.py [--n 4096] [--k 4096] [--bits 3] [--m 1,128] [--arch sm_90]

A random N x K weight in the shift-add layout (group 8, one power-of-two term per scale), as in
tools/bench_shift_add.py. The TVM kernel (effc.kernels.shift_add_cuda) is timed by TVM's
time_evaluator; torch's fp16 and fp32 (TF32 off) matmul + bias on the dense weight it stands for by
CUDA events; medians of repeated timings after warm-up. Agreement is checked against the op's numpy
reference in float64. The bytes each reads of its weight are printed beside: at M=1 the time is
mostly that read.
"""

from __future__ import annotations

import numpy as np
from bench_shift_add import (  # tools/ is on sys.path when run as a script
    layer_arguments,
    random_layer,
)


def torch_ms(fn, repeat: int = 200) -> float:
    """Median ms of ``fn()`` over ``repeat`` CUDA-event timings after warm-up."""
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main() -> None:
    parser = layer_arguments(__doc__)
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()

    import torch
    import tvm

    from effc.codegen.target import cuda_target
    from effc.kernels import shift_add_cuda as kernel
    from effc.ops import shift_add_matmul as op

    if not tvm.cuda(0).exist or not torch.cuda.is_available():
        raise SystemExit("bench_shift_add_cuda: no GPU visible to TVM and torch")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    q, n, k = args.bits, args.n, args.k
    planes, codes, bias = random_layer(rng, q, n, k)
    dense = op.dense_weight(planes, codes).astype(np.float32)
    w32 = torch.from_numpy(dense.T.copy()).cuda()
    w16, b32 = w32.half(), torch.from_numpy(bias).cuda()
    b16 = b32.half()
    lut_mb = (planes.size + codes.size) / 2**20
    print(f"{torch.cuda.get_device_name(0)}; {n}x{k} linear, {q} planes; weight bytes read: LUT {lut_mb:.1f} MiB, "
          f"fp16 {n * k * 2 / 2**20:.1f} MiB, fp32 {n * k * 4 / 2**20:.1f} MiB")
    print("| M | shift-add LUT (TVM) ms | torch fp16 ms | torch fp32 ms | LUT / fp16 | max rel err vs reference |")
    print("|---|---|---|---|---|---|")
    for m in (int(v) for v in args.m.split(",")):
        choice = kernel.choose(planes, codes, m)
        lib = tvm.compile(tvm.IRModule({choice.symbol: choice.func.with_attr("global_symbol", choice.symbol)}),
                          target=cuda_target(args.arch).tvm()).jit()
        x = rng.standard_normal((m, k)).astype(np.float32)
        operands = [tvm.runtime.tensor(a, dev) for a in (x, *choice.weights, bias)]
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32), dev)  # poisoned: every element must be written
        lib[choice.symbol](*operands, y)
        dev.sync()
        reference = op.reference(x.astype(np.float64), planes, codes, bias)
        error = float(np.abs(y.numpy() - reference).max() / np.abs(reference).max())
        timer = lib.time_evaluator(choice.symbol, dev, number=50, repeat=20, min_repeat_ms=0)
        lut = float(np.median(timer(*operands, y).results) * 1e3)
        x32 = torch.from_numpy(x).cuda()
        x16 = x32.half()
        fp16 = torch_ms(lambda: torch.addmm(b16, x16, w16))
        fp32 = torch_ms(lambda: torch.addmm(b32, x32, w32))
        print(f"| {m} | {lut:.4f} | {fp16:.4f} | {fp32:.4f} | {lut / fp16:.2f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
