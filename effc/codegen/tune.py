"""`effc tune`: search the knobs of the CPU rules per distinct workload, keep the best in a record file.

In-process (MetaSchedule's task scheduler crashes in this TVM wheel): each distinct kernel is
scheduled with each candidate knob set, built alone and timed with time_evaluator on random data.
A kernel whose weight the rule pre-packs is timed as it runs in the model: its packing half is
split off first (the build runs it once at compile time), so the pack is not charged per call.
The record file is rewritten after every workload, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effc.codegen.records import load_records, save_records, workload_key


@dataclass
class TuneResult:
    workloads: int
    tuned: int  # newly measured this run (the rest came from the record file)
    seconds: float
    kernels: dict[str, str] = field(default_factory=dict)  # every kernel the rule takes -> its workload key


def tune_model(model, trials: int, record_path: str | Path, progress=print, repeat: int = 5,
               precision: str = "fp32") -> TuneResult:
    """Tune every matmul workload of ``model`` for the host CPU with up to ``trials`` knob sets each;
    ``precision`` as `effc compile --precision` (bf16 tunes the bf16 matmul rule)."""
    from effc.codegen.build import front_half
    from effc.codegen.precision import choose
    from effc.codegen.target import llvm_target

    start = time.perf_counter()
    bt = llvm_target()
    target = bt.tvm()
    precision = choose(precision, target)[0]
    _, kernels, _ = front_half(model, bt, target, precision)  # the kernels exactly as compile_model schedules them
    rules = tunable_rules(target, precision)
    defaults = {rule.name: rule.default_knobs(target) for rule in rules}
    records = load_records(record_path)
    workloads, names = {}, {}
    for gv, func in kernels.functions_items():
        key = workload_key(func, target) if _is_primfunc(func) else None
        if key and key in workloads:
            names[gv.name_hint] = key
            continue
        # the rule that takes the kernel in the build: the first of the build's order that schedules it
        owner = next((r for r in rules if key and r.schedule(func, target=target, **defaults[r.name]) is not None),
                     None)
        if owner is not None:
            names[gv.name_hint] = key
            workloads[key] = (gv.name_hint, func, owner)
    tuned = 0
    for index, (key, (name, func, rule)) in enumerate(workloads.items(), 1):
        if records.get(key, {}).get("trials", 0) >= trials:
            progress(f"[{index}/{len(workloads)}] {name}: recorded {records[key]['ms']:.3f} ms {records[key]['knobs']}")
            continue
        best = None
        for knobs in _candidates(rule, defaults[rule.name], trials):
            sch = rule.schedule(func, target=target, **knobs)
            if sch is None:
                continue
            try:
                ms = time_kernel(sch.mod["main"], target, repeat)
            except Exception:  # a knob set TVM cannot build: skip it
                if os.environ.get("EFFC_DEBUG"):
                    raise
                continue
            if best is None or ms < best[0]:
                best = (ms, knobs)
        if best is None:
            continue
        records[key] = {"rule": rule.name, "knobs": best[1], "ms": round(best[0], 4), "kernel": name,
                        "trials": trials}
        save_records(record_path, records)
        tuned += 1
        progress(f"[{index}/{len(workloads)}] {name}: {best[0]:.3f} ms with {best[1]}")
    return TuneResult(len(workloads), tuned, round(time.perf_counter() - start, 1), names)


TUNED_RULES = ("int8-matmul", "matmul-bf16", "matmul")  # the rule names tunable_rules picks from


def tunable_rules(target, precision: str) -> list:
    """The CPU matmul rules the tuner searches, in the build's order (effc.codegen.schedules.cpu):
    int8 (kernels lowered from QDQ, on VNNI; on AMX its tile is fixed: nothing to search), then bf16
    (on vdpbf16ps; on AMX its tile is fixed too) or fp32 as ``precision`` says."""
    from effc.codegen.schedules.cpu.int8_matmul import Int8Matmul, has_amx_int8, has_vnni
    from effc.codegen.schedules.cpu.matmul import Matmul
    from effc.codegen.schedules.cpu.matmul_bf16 import MatmulBf16

    rules = [Int8Matmul()] if has_vnni(target) and not has_amx_int8(target) else []
    if precision == "bf16":
        from effc.kernels import native
        from effc.codegen.schedules.cpu.matmul_bf16 import has_amx_bf16

        native.load("bf16_tile")  # the tile the timed kernels call
        if not has_amx_bf16(target):
            rules.append(MatmulBf16())
    else:
        rules.append(Matmul())
    return rules


def _candidates(rule, default: dict, trials: int) -> list[dict]:
    """The default first, then the rest of the grid, nearest the default first."""
    grid = [dict(zip(rule.KNOBS, values)) for values in itertools.product(*rule.KNOBS.values())]
    grid.sort(key=lambda k: (k != default, abs(k["mr"] - default["mr"]) + 4 * abs(k["nr_vectors"] - default["nr_vectors"])))
    return grid[:max(1, trials)]


def _is_primfunc(func) -> bool:
    """A kernel the rules schedule (hand-written ones, e.g. the shift-add LUT kernels, are not tuned)."""
    from tvm import tirx

    from effc.codegen.apply import is_scheduled

    return isinstance(func, tirx.PrimFunc) and not is_scheduled(func)


def time_kernel(func, target, repeat: int = 5) -> float:
    """Median ms of one call of a scheduled kernel on random inputs, its weight packing excluded."""
    import tvm

    from effc.codegen.lower import tir_pipeline

    compute = _without_prepack(func).with_attr("global_symbol", "main")  # fused kernels are private
    exe = tvm.compile(tvm.IRModule({"main": compute}), target=target, tir_pipeline=tir_pipeline(target))
    rng = np.random.default_rng(0)
    args = []
    for buf in compute.params:  # TVM 0.27: a PrimFunc param is its buffer
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
                                       else np.zeros(shape, dtype)))
    evaluator = exe.jit().time_evaluator("main", tvm.cpu(), number=3, repeat=repeat, min_repeat_ms=20)
    return float(np.median(evaluator(*args).results) * 1e3)


def _without_prepack(func):
    """The compute half of a kernel whose rule marked a weight-packing block (the build's
    SplitLayoutRewritePreproc, applied to a one-call Relax wrapper); the kernel itself otherwise."""
    from tvm import relax

    if "layout_rewrite_preproc" not in func.script():
        return func
    bb = relax.BlockBuilder()
    buffers = list(func.params)
    inputs = [relax.Var(f"p{i}", relax.TensorType([int(d) for d in b.shape], str(b.dtype)))
              for i, b in enumerate(buffers[:-1])]
    out = buffers[-1]
    with bb.function("main", inputs):
        with bb.dataflow():
            kernel = bb.add_func(func, "kernel")
            result = bb.emit_output(relax.call_tir(kernel, inputs, relax.TensorType([int(d) for d in out.shape],
                                                                                    str(out.dtype))))
        bb.emit_func_output(result)
    split = relax.transform.SplitLayoutRewritePreproc()(bb.get())
    for gv, f in split.functions_items():
        if gv.name_hint.endswith("_prepacked"):
            return f
    return func
