"""Check a compiled module against ONNX Runtime, and find the kernel to blame when it disagrees.

`effc compile --target` runs this on every build: a module that is silently wrong is the worst
result effc can give. The end-to-end check runs the built module and ONNX Runtime (on the exported
ONNX model) on the same feeds; when they disagree, every kernel as the rules scheduled it is run
against the same kernel unscheduled (TVM's plain loop nest, built for the CPU), on the same random
buffers, which names the kernel (and so the rule) that computes wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOLERANCE = 1e-4  # scale-relative (effc.verify.Deviation.max_rel): fp32 reassociation and fast math pass


@dataclass
class KernelFault:
    kernel: str
    rule: str
    max_rel: float

    def describe(self) -> str:
        return f"{self.kernel} (rule {self.rule}, max rel err {self.max_rel:.1e} against its unscheduled form)"


def compare_with_ort(out_dir, model, feeds: list[dict]):
    """The Deviation of the module in ``out_dir`` from ONNX Runtime on ``model`` over ``feeds``."""
    from effc.codegen.runtime import load_compiled
    from effc.verify import OrtRunner, deviation

    compiled = load_compiled(out_dir)
    got = [compiled(f) for f in feeds]
    return deviation(got, OrtRunner(model).run_all(feeds))


def random_buffers(func, rng) -> list[np.ndarray] | None:
    """One array per buffer parameter of ``func`` (None when a shape is symbolic): integers 0/1, so
    gather indices stay in range; floats N(0, 1)."""
    arrays = []
    for buf in func.params:  # TVM 0.27: a PrimFunc param is its buffer
        try:
            shape = [int(d) for d in buf.shape]
        except TypeError:
            return None
        dtype = str(buf.dtype)
        if dtype == "bool":
            arrays.append(rng.integers(0, 2, size=shape).astype(bool))
        elif dtype.startswith(("int", "uint")):
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def kernel_errors(plain, scheduled, target, device, ref_target=None, seed: int = 0) -> list[float] | None:
    """Max rel error of each buffer ``scheduled`` wrote, against ``plain`` (the same kernel before
    scheduling, built for ``ref_target``, default ``target``) on the same random buffers."""
    import tvm

    from effc.verify import deviation

    arrays = random_buffers(scheduled, np.random.default_rng(seed))
    if arrays is None:
        return None
    name = "kernel"
    ref_lib = tvm.compile(tvm.IRModule({name: plain.with_attr("global_symbol", name)}),
                          target=ref_target or target).jit()
    from effc.codegen.lower import tir_pipeline

    # the scheduled kernel through effc's own TIR pipeline, as the build runs it (bf16 tiles become calls)
    lib = tvm.compile(tvm.IRModule({name: scheduled.with_attr("global_symbol", name)}), target=target,
                      tir_pipeline=tir_pipeline(target)).jit()
    ref = [tvm.runtime.tensor(a) for a in arrays]
    got = [tvm.runtime.tensor(a, device) for a in arrays]
    ref_lib[name](*ref)
    lib[name](*got)
    device.sync()
    return [deviation([{"out": g.numpy()}], [{"out": r.numpy()}]).max_rel for g, r, a in zip(got, ref, arrays)
            if not np.array_equal(r.numpy(), a, equal_nan=True)]  # the buffers the kernel wrote


def find_wrong_kernels(fused, rules, target, tol: float = TOLERANCE) -> list[KernelFault]:
    """Schedule each kernel of ``fused`` (an IRModule fused but not scheduled, for a CPU target) with
    ``rules`` and return those whose scheduled form disagrees with their unscheduled one, in order."""
    import tvm

    from effc.codegen.apply import RuleLog, apply_rules, is_scheduled

    plain = {gv.name_hint: func for gv, func in fused.functions_items() if isinstance(func, tvm.tirx.PrimFunc)}
    log = RuleLog()
    with target:
        scheduled = apply_rules(rules, log)(fused)
    faults = []
    for gv, func in scheduled.functions_items():
        name = gv.name_hint
        if name not in plain or is_scheduled(plain[name]):  # hand-written kernels: tests/kernels check them
            continue
        errors = kernel_errors(plain[name], func, target, tvm.cpu(0))
        worst = max(errors or [], default=0.0)
        if worst > tol:
            faults.append(KernelFault(name, log.kernels.get(name, "?"), worst))
    return faults


def verify_build(out_dir, model, feeds: list[dict], bt, records, tol: float = TOLERANCE, precision: str = "fp32"):
    """Run the module in ``out_dir`` (built from ``model`` for ``bt`` at ``precision``, the one taken)
    against ONNX Runtime on ``feeds``; its Deviation when within ``tol`` (bf16: within
    effc.codegen.precision's bf16 bounds; the deviation is recorded in codegen.json). Otherwise raise
    EffcFault naming the first wrong kernel (CPU builds: each kernel against its unscheduled form,
    with the rules the build used; that check stays at ``tol``, bf16 kernels included)."""
    from effc.codegen.build import build_rules, front_half
    from effc.codegen.precision import BF16_MAX_REL, BF16_MIN_COSINE, float_bound, within_tolerance
    from effc.codegen.qdq_tolerance import flip_eps, tolerance_for
    from effc.errors import EffcFault

    dev = compare_with_ort(out_dir, model, feeds)
    record_deviation(out_dir, dev)
    # beyond the float bound, a quantized model is held to ONNX Runtime's own rounding and the steps the
    # module's float rounding (bf16: bf16's) may flip
    if precision in ("fp32", "bf16") and dev.max_rel > float_bound(precision, tol):
        tol = tolerance_for(model, feeds, tol, eps=flip_eps(precision))
    if within_tolerance(precision, dev, tol):
        return dev
    where = "no single kernel was found to disagree with its unscheduled form"
    if bt.kind == "llvm":
        tvm_target = bt.tvm()
        _, fused, _ = front_half(model, bt, tvm_target, precision)
        faults = find_wrong_kernels(fused, build_rules(bt, records)[0], tvm_target, tol)
        if faults:
            where = f"first wrong kernel: {faults[0].describe()}"
            if len(faults) > 1:
                where += f"; {len(faults) - 1} more: {', '.join(f.kernel for f in faults[1:])}"
    bound = (f"max rel err {dev.max_rel:.2e}, cosine {dev.cosine:.6f}; bf16 allows {max(BF16_MAX_REL, tol):g}, "
             f"{BF16_MIN_COSINE:g}" if precision == "bf16" else f"max rel err {dev.max_rel:.2e} > {tol:g}")
    raise EffcFault(f"the compiled module disagrees with ONNX Runtime ({bound} "
                    f"on {len(feeds)} input(s)); {where}. Please report it with the model")


def record_deviation(out_dir, dev) -> None:
    """Add the module's measured deviation from fp32 ONNX Runtime to its codegen.json."""
    import json
    from pathlib import Path

    from effc.codegen.runtime import MANIFEST
    from effc.ir import atomic_write_text

    path = Path(out_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["deviation_vs_ort"] = dev.as_dict()
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
