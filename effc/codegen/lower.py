"""Relax -> scheduled TIR, with constant weights pre-packed at compile time.

Order: legalize and fuse (TVM's passes), mark weight buffers as layout-free, apply the target's
schedule rules (a rule may give a weight a blocked layout by emitting a
``meta_schedule.layout_rewrite_preproc`` block), split those packing blocks into their own
kernels, lift every weight-only computation into ``main_transform_params`` and run it once here,
on the host, so the shipped params are already packed and ``main`` never repacks them.
"""

from __future__ import annotations

import os

import numpy as np

TRANSFORM = "main_transform_params"


class Counted:
    """Wraps a schedule rule to count the kernels it scheduled, so a kernel that no rule took is
    visible in the build report instead of silently running unscheduled."""

    def __init__(self, rule, hits: dict, errors: list | None = None):
        self.rule, self.hits = rule, hits
        self.errors = errors if errors is not None else []
        self.label = getattr(rule, "name", type(rule).__name__)

    def apply(self, func, target, tunable):
        try:
            sch = self.rule.apply(func, target, tunable)
        except Exception as exc:  # a rule that breaks on a kernel passes it down the list, visibly
            key = f"{self.label}:error"
            self.hits[key] = self.hits.get(key, 0) + 1
            if os.environ.get("EFFC_DEBUG"):
                raise
            self.errors.append(f"{self.label}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"
                               if str(exc).strip() else f"{self.label}: {type(exc).__name__}")
            return None
        if sch is not None:
            self.hits[self.label] = self.hits.get(self.label, 0) + 1
        return sch

    def is_target_available(self, target):
        return self.rule.is_target_available(target)


def schedule(mod, target, rules):
    """Legalize, fuse and schedule every kernel of ``mod`` for ``target`` (a tvm Target)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    prepack = target.kind.name == "llvm"
    passes = [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
              relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if prepack:
        passes += [relax.transform.CanonicalizeBindings(), relax.transform.AttachAttrLayoutFreeBuffers()]
    passes.append(dl.ApplyDefaultSchedule(*rules))
    if prepack:
        # GPU weight transforms would be GPU kernels that cannot run at compile time here, so
        # lifting is CPU-only for now.
        passes += [relax.transform.SplitLayoutRewritePreproc(), relax.transform.LiftTransformParams(),
                   relax.transform.FoldConstant()]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def finish_pipeline(target):
    """The rest of TVM's backend pipeline (memory planning, VM lowering) for already-scheduled code."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_backend
    from tvm.relax.backend.cuda import pipeline as cuda_backend

    backend = cuda_backend if target.kind.name == "cuda" else cpu_backend

    @tvm.transform.module_pass(opt_level=0, name="EffcFinish")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(backend.dataflow_lower_passes(target)
                                            + backend.finalize_passes(target))(mod)

    return _pipeline


def split_transform(mod):
    """(main module, transform_params module or None): each keeps only the functions it calls."""
    from tvm import relax

    names = [g.name_hint for g in mod.get_global_vars()]
    if TRANSFORM not in names:
        return mod, None
    prep = relax.transform.DeadCodeElimination([TRANSFORM])(mod)
    main = relax.transform.DeadCodeElimination(["main"])(_without(mod, TRANSFORM))
    return main, prep


def _without(mod, name):
    import tvm

    return tvm.IRModule({g: f for g, f in mod.functions_items() if g.name_hint != name}, attrs=mod.attrs)


def run_transform(prep, target, params: list[np.ndarray]) -> list[np.ndarray]:
    """Run ``main_transform_params`` on the host CPU (the target is the host when prep exists)."""
    import tvm
    from tvm import relax

    exe = tvm.compile(prep, target=target, relax_pipeline=finish_pipeline(target))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    packed = vm[TRANSFORM]([tvm.runtime.tensor(p) for p in params])
    return [t.numpy() for t in packed]
