"""Find the CUDA kernel that computes wrong: every kernel of a model, as scheduled for the GPU, against
the same kernel unscheduled and built for the CPU, on the same random buffers (a GPU needed).

    python tools/check_cuda_kernels.py MODEL [--arch sm_90] [--tol 1e-4]

MODEL: an ONNX file or zoo:NAME. A model that disagrees with ONNX Runtime end to end is localised
to the kernel(s) listed with an error over --tol. Integer buffers are filled with 0/1 (gather
indices stay in range); float buffers with N(0, 1); outputs start equal on both sides.
"""

from __future__ import annotations

import argparse


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
    from effc.codegen.check import kernel_errors
    from effc.codegen.relax_import import import_model
    from effc.codegen.schedules import rules_for
    from effc.codegen.target import cuda_target, llvm_target

    if not tvm.cuda(0).exist:
        raise SystemExit("check_cuda_kernels: no GPU visible to TVM")

    gpu, cpu = cuda_target(args.arch).tvm(), llvm_target().tvm()
    fused = lower.fuse(import_model(_load_model(args.model)[0], gpu).mod, gpu)
    plain = {gv.name_hint: func for gv, func in fused.functions_items()}  # the rules update fused in place
    log = RuleLog()
    scheduled = lower.schedule_kernels(fused, gpu, rules_for(gpu), log)
    bad = 0
    print("| kernel | rule | max rel err (per output buffer) |")
    print("|---|---|---|")
    for gv, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        if is_scheduled(plain[name]):  # hand-written GPU kernels: tests/kernels check them
            print(f"| {name} | {log.kernels.get(name)} | skipped: hand-written |")
            continue
        errors = kernel_errors(plain[name], func, gpu, tvm.cuda(0), ref_target=cpu)
        if errors is None:
            print(f"| {name} | {log.kernels.get(name)} | skipped: symbolic shape |")
            continue
        worst = max(errors, default=0.0)
        bad += worst > args.tol
        flag = " **WRONG**" if worst > args.tol else ""
        print(f"| {name} | {log.kernels.get(name)} | {', '.join(f'{e:.1e}' for e in errors)}{flag} |", flush=True)
    print(f"{bad} kernel(s) over {args.tol:g}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
