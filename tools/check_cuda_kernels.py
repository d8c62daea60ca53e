"""Find the CUDA kernel that computes wrong: every kernel of a model, as scheduled for the GPU, against
the same kernel unscheduled and built for the CPU, on the same random buffers (a GPU needed).

    python tools/check_cuda_kernels.py MODEL [--arch sm_90] [--tol 1e-4]

MODEL: an ONNX file or zoo:NAME. A model that disagrees with ONNX Runtime end to end is localised
to the kernel(s) listed with an error over --tol. Integer buffers are filled with 0/1 (gather
indices stay in range); float buffers with N(0, 1); outputs start equal on both sides.
"""

from __future__ import annotations

import argparse

import numpy as np


def random_buffers(func, rng) -> list[np.ndarray] | None:
    """One array per buffer parameter of ``func``, or None when a shape is symbolic."""
    arrays = []
    for buf in func.params:  # TVM 0.27: a PrimFunc param is its buffer
        try:
            shape = [int(d) for d in buf.shape]
        except TypeError:
            return None
        dtype = str(buf.dtype)
        if dtype.startswith(("int", "uint")):
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()

    import tvm

    from effc.cli import _load_model
    from effc.codegen import lower
    from effc.codegen.apply import RuleLog, is_scheduled
    from effc.codegen.relax_import import import_model
    from effc.codegen.schedules import rules_for
    from effc.codegen.target import cuda_target, llvm_target
    from effc.verify import deviation

    if not tvm.cuda(0).exist:
        raise SystemExit("check_cuda_kernels: no GPU visible to TVM")

    gpu, cpu = cuda_target(args.arch).tvm(), llvm_target().tvm()
    fused = lower.fuse(import_model(_load_model(args.model)[0], gpu).mod, gpu)
    plain = {gv.name_hint: func for gv, func in fused.functions_items()}  # the rules update fused in place
    log = RuleLog()
    scheduled = lower.schedule_kernels(fused, gpu, rules_for(gpu), log)
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    bad = 0
    print("| kernel | rule | max rel err (per output buffer) |")
    print("|---|---|---|")
    for gv, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        arrays = random_buffers(func, rng)
        if arrays is None:
            print(f"| {name} | {log.kernels.get(name)} | skipped: symbolic shape |")
            continue
        if is_scheduled(plain[name]):  # hand-written GPU kernels: tests/kernels check them
            print(f"| {name} | {log.kernels.get(name)} | skipped: hand-written |")
            continue
        ref_lib = tvm.compile(tvm.IRModule({name: plain[name].with_attr("global_symbol", name)}), target=cpu).jit()
        gpu_lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=gpu).jit()
        ref = [tvm.runtime.tensor(a) for a in arrays]
        got = [tvm.runtime.tensor(a, dev) for a in arrays]
        ref_lib[name](*ref)
        gpu_lib[name](*got)
        dev.sync()
        errors = [deviation([{"out": g.numpy()}], [{"out": r.numpy()}]).max_rel for g, r, a in zip(got, ref, arrays)
                  if not np.array_equal(r.numpy(), a)]  # buffers the kernel wrote
        worst = max(errors, default=0.0)
        bad += worst > args.tol
        flag = " **WRONG**" if worst > args.tol else ""
        print(f"| {name} | {log.kernels.get(name)} | {', '.join(f'{e:.1e}' for e in errors)}{flag} |", flush=True)
    print(f"{bad} kernel(s) over {args.tol:g}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
