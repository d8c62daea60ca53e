"""Relax -> scheduled TIR, with constant weights pre-packed at compile time.

Order: legalize and fuse (TVM's passes), mark weight buffers as layout-free, apply the target's
schedule rules (a rule may give a weight a blocked layout by emitting a
``meta_schedule.layout_rewrite_preproc`` block), split those packing blocks into their own
kernels, lift every weight-only computation into ``main_transform_params`` and run it once here,
on the host, so the shipped params are already packed and ``main`` never repacks them.
"""

from __future__ import annotations

import numpy as np

TRANSFORM = "main_transform_params"


def fuse(mod, target):
    """Legalize and fuse ``mod`` into kernels (PrimFuncs), not yet scheduled; weight buffers of
    each kernel are marked layout-free on CPU so that a rule may pre-pack them."""
    import tvm
    from tvm import relax

    from effc.codegen.fast_math import fast_math_passes, pow_to_multiply_pass
    from effc.codegen.unflatten_matmul import unflatten_matmul_pass

    # pow(x, small int) as multiplies everywhere: on CUDA, TVM builds with fast math, where powf of a
    # negative base is NaN (GPT-2's tanh GELU cubes x)
    passes = [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(), pow_to_multiply_pass()]
    if target.kind.name == "llvm":
        passes += [unflatten_matmul_pass(), relax.transform.DeadCodeElimination()]  # epilogues fuse
        passes += fast_math_passes()  # libm's exp/tanh/erf are scalar calls on CPU
    passes += [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
               relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if target.kind.name == "llvm":
        passes += [relax.transform.CanonicalizeBindings(), relax.transform.AttachAttrLayoutFreeBuffers()]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def schedule(mod, target, rules, log=None):
    """Legalize, fuse and schedule every kernel of ``mod`` for ``target`` (a tvm Target); ``log``
    (an apply.RuleLog) receives which rule took which kernel."""
    return schedule_kernels(fuse(mod, target), target, rules, log)


def schedule_kernels(fused, target, rules, log=None):
    """Schedule the kernels of an already fused module (updated in place, as TVM passes may)."""
    import tvm
    from tvm import relax

    from effc.codegen.apply import RuleLog, apply_rules
    from effc.codegen.cuda_bool_loads import serial_bool_loads_pass

    passes = [apply_rules(rules, log if log is not None else RuleLog())]
    if target.kind.name == "llvm":
        # GPU weight transforms would be GPU kernels that cannot run at compile time here, so
        # lifting is CPU-only for now.
        passes += [relax.transform.SplitLayoutRewritePreproc(), relax.transform.LiftTransformParams(),
                   relax.transform.FoldConstant()]
    else:
        passes += [serial_bool_loads_pass()]
    with target:
        return tvm.transform.Sequential(passes)(fused)


def build_config(target) -> dict:
    """PassContext options for building scheduled code. On CPU, a vector loop with a bound check
    (the last, partial tile of a padded matmul's write-back) becomes AVX-512 masked loads and
    stores instead of being scalarised."""
    return {"tirx.enable_buffer_level_predication": True} if target.kind.name == "llvm" else {}


def tir_pipeline(target) -> str:
    """The TIR pipeline to build scheduled kernels with: on CPU, TVM's with weight-panel prefetching
    (effc.codegen.prefetch) and the bf16 tiles' calls (effc.codegen.bf16_tile_call) in front."""
    if target.kind.name != "llvm":
        return "default"
    from effc.codegen.bf16_tile_call import register_pipeline

    return register_pipeline()


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
