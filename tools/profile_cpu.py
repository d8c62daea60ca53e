"""Per-kernel CPU time of compiled OUT directories, side by side, for a machine other jobs share.

    python tools/profile_cpu.py [--rounds 8] OUT [OUT ...]

1 thread (TVM_NUM_THREADS=1: every kernel runs on the calling thread, so ``time.thread_time``
around it counts its own CPU time, not the time the thread waited for a core). The Relax VM's
instrument times each call; per call position the minimum over the rounds is kept, the OUTs run in
alternating turns, and the calls are summed by kernel family (the int8 attention products are told
apart by their write-back: Q.K^T's ends dequantized, float scores for the softmax; P.V's quantized).
Also printed: the uninstrumented wall time of a call (min and median). Inputs: seeded random floats,
ones for integer inputs (token ids, attention masks).
"""

from __future__ import annotations

import argparse
import os
import re
import time

import numpy as np


def family(name: str) -> str:
    if name.startswith("vm."):
        return "vm builtins"
    if name.startswith("fused_attention"):  # effc.codegen.fused_attention: both products and the softmax
        return "attention (fused)"
    if "softmax" in name:
        return "softmax"
    if "matmul" in name and "subtract" in name and "prepacked" not in name:
        # a zero-point correction on an activation B (packed per call): attention's products; a
        # prepacked weight is a linear's (the LM head's corrections included)
        return "Q.K^T" if re.search(r"dequantize\d+$", name) else "P.V"
    if "matmul" in name:
        return "linears (+ patch embedding, head)"
    if any(op in name for op in ("tanh", "erf", "gelu")):  # GELU's chain (QDQ: requantised after each op)
        return "GELU (elementwise)"
    if any(op in name for op in ("transpose", "reshape", "split", "strided_slice")):
        # a residual add's kernel starts with the reshape of the linear's output: arithmetic, not layout
        return "residual add" if "add" in name else "layout"
    if "_sum" in name:
        return "row/column sums"
    if "layer_norm" in name:
        return "layer norm"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"
    from effc.codegen.runtime import load_compiled

    runs = {}
    for out in args.outs:
        module = load_compiled(out, threads=1)
        rng = np.random.default_rng(0)
        feed = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) if i["dtype"].startswith("float")
                else np.ones(i["shape"], i["dtype"]) for i in module.manifest["inputs"]}
        runs[out] = {"module": module, "args": module.args(feed), "best": None, "names": [], "walls": []}
    for _ in range(2):  # warm-up
        for run in runs.values():
            run["module"].vm["main"](*run["args"], *run["module"].params)
    for _ in range(args.rounds):
        for run in runs.values():
            vm, params = run["module"].vm, run["module"].params
            times, names, started = [], [], []

            def instrument(func, symbol, before, ret, *call_args):
                if before:
                    started.append(time.thread_time())
                else:
                    times.append(time.thread_time() - started.pop())
                    names.append(symbol)
                return 0

            vm.set_instrument(instrument)
            try:
                vm["main"](*run["args"], *params)
            finally:
                vm.set_instrument(None)
            start = time.perf_counter()
            vm["main"](*run["args"], *params)
            run["walls"].append(time.perf_counter() - start)
            run["best"] = np.array(times) if run["best"] is None else np.minimum(run["best"], times)
            run["names"] = names
    for out, run in runs.items():
        families: dict[str, float] = {}
        for name, seconds in zip(run["names"], run["best"]):
            families[family(name)] = families.get(family(name), 0.0) + seconds * 1e3
        walls = np.array(run["walls"]) * 1e3
        print(f"{out}: kernels {sum(families.values()):.2f} ms CPU (per-call min over {args.rounds} rounds); "
              f"wall min {walls.min():.2f}, median {np.median(walls):.2f} ms")
        print("   " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(families.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
