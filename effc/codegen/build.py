"""compile_model: import, schedule, pre-pack weights, build and export one OUT directory.

OUT/model.so      the Relax VM executable (plain TVM: tvm.runtime.load_module + relax.VirtualMachine;
                  call vm["main"](*inputs, *params))
OUT/params.bin    main's trailing parameters, already pre-packed, in tvm.runtime.save_param_dict
                  format, keyed p0000, p0001, ... in call order
OUT/build.log     what TVM's C++ side printed during `effc compile`'s build (absent when nothing)
OUT/codegen.json  manifest: target, inputs (name, shape, dtype), outputs, rule hits, the rule of
                  each kernel, how each effc op was lowered (custom_ops), build time
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from effc.codegen.records import SHIPPED
from effc.codegen.runtime import MANIFEST, Compiled, load_compiled, run_compiled  # noqa: F401 (API)
from effc.codegen.target import BuildTarget, make_target
from effc.errors import EffcError

LIBRARY = "model.so"
PARAMS = "params.bin"
BUILD_LOG_NAME = "build.log"  # written by `effc compile` around compile_model (effc/native_log.py)


@dataclass
class BuildResult:
    out_dir: Path
    seconds: float
    rule_hits: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # kernel name -> rule ("unscheduled" when none took it)
    custom_ops: list = field(default_factory=list)  # per effc op node: its lowering (custom_ops.Lowering)
    custom_summary: str = ""
    rule_errors: list = field(default_factory=list)  # "kernel: rule: error" for each rule that raised
    precision: str = "fp32"  # what the float matmuls compute in (effc.codegen.precision)
    precision_reason: str = ""
    tuned_kernels: int = 0  # kernels scheduled with knobs from a tuning record


def compile_model(model: ir.Model, target: BuildTarget | str = "llvm", out_dir: str | Path = "out",
                  arch: str | None = None, rules: list | None = None,
                  records: str | Path | None = SHIPPED, source: str | None = None,
                  precision: str = "fp32") -> BuildResult:
    """Compile ``model`` for ``target`` ("llvm", "cuda" or a BuildTarget) into ``out_dir``;
    ``out_dir`` is written in place (`effc compile` passes its staging directory, see effc/outdir.py);
    ``records``: a tuning record file (`effc tune`) whose knobs override the rules' defaults,
    SHIPPED (effc's records for the host CPU family, when it has some) or None; ``source``: what
    the model was loaded from (a path or zoo:NAME), kept in the manifest for `effc bench`;
    ``precision``: fp32, bf16 or auto (effc.codegen.precision: what is taken, and why, is recorded)."""
    import tvm

    from effc.codegen import lower
    from effc.codegen.apply import RuleLog
    from effc.codegen.precision import choose
    from effc.ir import atomic_write_text

    start = time.perf_counter()
    bt = target if isinstance(target, BuildTarget) else make_target(target, arch)
    tvm_target = bt.tvm()
    precision, precision_reason = choose(precision, tvm_target)
    log = RuleLog()
    default_rules, records_from = build_rules(bt, records)
    rules = rules if rules is not None else default_rules
    try:
        imported, fused, params = front_half(model, bt, tvm_target, precision)
        mod = lower.schedule_kernels(fused, tvm_target, rules, log)
        main, prep = lower.split_transform(mod)
        params = lower.run_transform(prep, tvm_target, params) if prep is not None else params
        with tvm.transform.PassContext(config=lower.build_config(tvm_target)):
            exe = tvm.compile(main, target=tvm_target, relax_pipeline=lower.finish_pipeline(tvm_target),
                              tir_pipeline=lower.tir_pipeline(tvm_target))
    except EffcError:
        raise
    except Exception as exc:
        if os.environ.get("EFFC_DEBUG"):
            raise
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise EffcError(f"TVM build for {bt.describe()} failed ({type(exc).__name__}: "
                        f"{lines[-1][:200] if lines else ''})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exe.export_library(str(out / LIBRARY), addons=native_objects(log.kernels, tvm_target))
    tvm.runtime.save_param_dict_to_file({f"p{i:04d}": tvm.runtime.tensor(p) for i, p in enumerate(params)},
                                        str(out / PARAMS))
    seconds = round(time.perf_counter() - start, 2)
    manifest = {"target": bt.kind, "arch": bt.arch, "target_spec": bt.spec, "threads": bt.threads,
                "inputs": [{"name": n, "shape": list(s), "dtype": d}
                           for n, s, d in zip(imported.input_names, imported.input_shapes, imported.input_dtypes)],
                "outputs": imported.output_names, "library": LIBRARY, "params": PARAMS,
                "num_params": len(params), "rule_hits": log.hits, "rule_errors": log.errors[:20],
                "kernels": log.kernels, "custom_ops": imported.custom_ops, "records": records_from,
                "tuned_kernels": len(log.tuned), "source": source,
                "precision": precision, "precision_reason": precision_reason,
                "build_seconds": seconds}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return BuildResult(out, seconds, log.hits, log.kernels, imported.custom_ops, imported.custom_summary, log.errors,
                       precision, precision_reason, len(log.tuned))


def native_objects(kernels: dict[str, str], tvm_target=None) -> list[str]:
    """The C kernels (effc/kernels/*.c) the rules that took ``kernels`` call, to link into model.so:
    bf16 matmuls' tiles, fused attention, and int8 matmuls' where they were built as AMX tiles for
    ``tvm_target``."""
    from effc.codegen.schedules.cpu.int8_matmul import has_amx_int8
    from effc.kernels import native

    from effc.codegen.fused_attention import RULE as ATTENTION

    rules = set(kernels.values())
    names = ["bf16_tile"] if "matmul-bf16" in rules else []
    names += ["attention_f32"] if ATTENTION in rules else []
    if "int8-matmul" in rules and tvm_target is not None and has_amx_int8(tvm_target):
        names.append("int8_tile")
    return [str(native.object_file(name)) for name in names]


def build_rules(bt: BuildTarget, records=SHIPPED) -> tuple[list, str | None]:
    """(the schedule rules for ``bt`` with ``records``' knobs, where those records came from).
    CUDA rules take no records (the tuner measures CPU kernels only)."""
    from effc.codegen.records import resolve_records
    from effc.codegen.schedules import rules_for

    tvm_target = bt.tvm()
    recorded, records_from = resolve_records(records, tvm_target) if bt.kind == "llvm" else ({}, None)
    return rules_for(tvm_target, recorded), records_from


def front_half(model: ir.Model, bt: BuildTarget, tvm_target=None, precision: str = "fp32"):
    """(imported model, its kernels fused but not yet scheduled, main's params): the build up to the
    schedule rules, import -> prepare -> fuse. `effc tune` and the tests take the kernels that a
    build schedules from here. ``tvm_target``: ``bt.tvm()``, when the caller has it already;
    ``precision``: the one taken (fp32 or bf16: effc.codegen.precision.choose)."""
    from effc.codegen import lower
    from effc.codegen.relax_import import import_model

    tvm_target = tvm_target or bt.tvm()
    imported = import_model(model, tvm_target)
    mod, params = prepare(imported, bt, precision)
    return imported, lower.fuse(mod, tvm_target), params


def prepare(imported, bt: BuildTarget, precision: str = "fp32"):
    """(module, params) of an imported model, ready to fuse: on CPU, convolutions become matmuls
    (patch embeddings) or im2col + GEMM with their epilogues ahead of the NCHW reshape, a split's
    pieces become strided slices that fuse into their readers, attention becomes one kernel under
    ``precision`` fp32 (effc.codegen.fused_attention) while under bf16 its matmuls, as every float
    matmul, take bf16 operands, and weight-only computations are evaluated once, here."""
    mod, params = imported.mod, imported.params
    if bt.kind == "llvm":
        from tvm import relax

        from effc.codegen import fused_attention
        from effc.codegen.conv_gemm import conv_gemm_pass
        from effc.codegen.patchify import patchify_conv
        from effc.codegen.prefold import fold_weight_transforms
        from effc.codegen.sink_reshape import sink_reshape_pass
        from effc.codegen.split_views import split_views_pass

        mod = sink_reshape_pass()(conv_gemm_pass(precision)(patchify_conv()(mod)))
        mod = split_views_pass()(mod)  # a split's pieces read in place by their (layout) kernels
        if precision == "fp32" and fused_attention.available(bt.tvm()):
            # bf16 keeps attention's products on the AMX / vdpbf16ps tiles: 2x faster there than
            # this fp32 kernel (vit-s16: 3.5 ms unfused bf16 against 5.2 ms fused fp32)
            mod = relax.transform.DeadCodeElimination()(fused_attention.fused_attention_pass(bt.threads)(mod))
        if precision == "bf16":
            from effc.codegen.bf16_matmul import bf16_matmul_pass

            mod = bf16_matmul_pass()(mod)
        mod, params = fold_weight_transforms(mod, params, bt.tvm())
    return mod, params
