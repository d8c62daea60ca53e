"""One generality case end to end, as `effc compile --target llvm` runs it: load the exported ONNX
file, run the default pass list, build for llvm, then run the module and compare it with ONNX
Runtime on the exported file. Shared by tests/generality/test_architectures.py and
tools/generality_sweep.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.generality.architectures import ARCHITECTURES
from tests.generality.export import export

TOLERANCE = 1e-4  # scale-relative (effc.verify.deviation's max_rel)
IMPLS = ("sdpa", "eager")
# Ops whose kernels must land on a compute rule; a fallback-scheduled kernel made only of data
# movement and elementwise ops (reshape, transpose, take, where, add, ...) is what the fallback
# rule is for (parallel outer loops, vectorised inner loop).
_COMPUTE_OP = re.compile(r"(?:^|_)(conv[123]d(?:_transpose)?|(?:adaptive_)?(?:max|avg)_pool[123]d|"
                         r"(?:batch|layer|rms|group|instance)_norm|matmul|dense|softmax|sum|mean|variance|max|"
                         r"min|prod|attention|cumsum|argmax|argmin)(?=\d|_|$)")


@dataclass(frozen=True)
class Case:
    arch: str
    impl: str  # "sdpa" (transformers' default), "eager", or "default" for models without a choice (no attention, or LeViT's own)
    batch: int

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.impl}-b{self.batch}"

    @property
    def attn(self) -> str | None:
        return None if self.impl == "default" else self.impl


# Exports torch 2.13 refuses (sdpa's output strides in the exporter's fake tensors do not allow
# the model's `.view` after the attention): these architectures are covered through eager only.
EXPORT_REFUSED = {
    ("swin", "sdpa"): "torch.onnx.export: Cannot view a tensor with shape [4, 49, 2, 12] and strides "
                      "(1176, 12, 588, 1) as a tensor with shape (4, 49, 24) (sdpa output in SwinSelfAttention)",
    ("t5-encoder", "sdpa"): "torch.onnx.export: Cannot view a tensor with shape [1, 11, 3, 16] and strides "
                            "(528, 16, 176, 1) as a tensor with shape (1, 11, 48) (sdpa output in T5Attention)",
}


def all_cases() -> list[Case]:
    """Every architecture at batch 1 and 2; those with an sdpa attention exported with sdpa and eager."""
    cases = []
    for name, arch in ARCHITECTURES.items():
        impls = IMPLS if arch.sdpa else ("default",)
        for impl in impls:
            if (name, impl) in EXPORT_REFUSED:
                continue
            cases.extend(Case(name, impl, batch) for batch in (1, 2))
    return cases


@dataclass
class Exported:
    path: Path
    feed: dict[str, np.ndarray]
    torch_output: np.ndarray
    ops: dict[str, int]


@dataclass
class Outcome:
    """What compiling one case gave: the pass records, the build (or the one-line refusal) and
    the compiled module's deviation from ONNX Runtime."""

    records: list = field(default_factory=list)  # effc.report.PassRecord per pass
    error: str | None = None  # the EffcError (or crash) that stopped the build
    out_dir: Path | None = None
    kernels: dict[str, str] = field(default_factory=dict)  # kernel -> rule
    rule_errors: list[str] = field(default_factory=list)
    max_rel: float | None = None

    def off_rule(self) -> dict[str, str]:
        """Kernels on "unscheduled", and those on "fallback" that carry a compute op -> the op."""
        bad = {}
        for kernel, rule in self.kernels.items():
            if rule == "unscheduled":
                bad[kernel] = "unscheduled: " + (",".join(compute_ops(kernel)) or "injective")
            elif rule == "fallback" and compute_ops(kernel):
                bad[kernel] = "fallback: " + ",".join(compute_ops(kernel))
        return bad


def compute_ops(kernel: str) -> list[str]:
    """The compute ops in a kernel's name (TVM names a fused kernel after its ops)."""
    return _COMPUTE_OP.findall(kernel)


def export_case(case: Case, directory: Path) -> Exported:
    import onnx

    path, feed, expected = export(case.arch, case.attn, case.batch, directory / f"{case.id}.onnx")
    proto = onnx.load(path, load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return Exported(path, feed, expected, ops)


def compile_case(exported: Exported, out_dir: Path) -> Outcome:
    """Default passes, llvm build, run and compare; every failure is caught into the Outcome.

    ``out_dir`` must be unique per build: a process that loaded one model.so gets the same
    library back for any later file at that path (dlopen caches by path)."""
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled
    from effc.errors import EffcError
    from effc.frontend.onnx import load
    from effc.ir import save
    from effc.passes import parse_pass_list
    from effc.pipeline import run_pipeline
    from effc.verify import OrtRunner, deviation

    outcome = Outcome()
    feeds = [exported.feed]
    try:
        result = run_pipeline(load(exported.path), parse_pass_list(None), feeds=feeds)
        outcome.records = result.records
        save(result.model, out_dir / "model.onnx")  # as `effc compile` writes it (`effc bench` reads it)
        built = compile_model(result.model, "llvm", out_dir, source=str(exported.path))
    except EffcError as exc:
        outcome.error = str(exc)
        return outcome
    except Exception as exc:  # effc's own fault: reported as such, the other cases still run
        outcome.error = f"crashed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        return outcome
    outcome.out_dir, outcome.kernels = built.out_dir, dict(built.kernels)
    outcome.rule_errors = json.loads((built.out_dir / "codegen.json").read_text()).get("rule_errors", [])
    try:
        got = [load_compiled(built.out_dir)(feed) for feed in feeds]
    except Exception as exc:
        outcome.error = f"the built module failed to run: {type(exc).__name__}: {str(exc).strip()[:200]}"
        return outcome
    outcome.max_rel = deviation(got, OrtRunner(exported.path).run_all(feeds)).max_rel
    return outcome


def pass_summary(record) -> str:
    """One phrase for a PassRecord: applied (rewrites), refused (first reason) or nothing to do."""
    if record.status == "applied":
        return f"applied ({len(record.rewrites)} rewrites)"
    if record.skipped:
        return f"refused ({len(record.skipped)}): {record.skipped[0].reason}"
    if record.note:
        return f"{record.status}: {record.note}"
    return "no candidate"


def off_rule_summary(outcome: Outcome) -> str:
    """"conv2d x5 (fallback), ...; injective x12 (fallback)": the kernels not on a real rule, then
    the count of data-movement / elementwise kernels the fallback rule scheduled."""
    counts: dict[tuple[str, str], int] = {}
    for where in outcome.off_rule().values():
        rule, ops = where.split(": ", 1)
        for op in ops.split(","):
            counts[op, rule] = counts.get((op, rule), 0) + 1
    parts = [", ".join(f"{op} x{n} ({rule})" for (op, rule), n in sorted(counts.items()))]
    injective = sum(rule == "fallback" and not compute_ops(k) for k, rule in outcome.kernels.items())
    parts.append(f"injective x{injective} (fallback)" if injective else "")
    return "; ".join(p for p in parts if p) or "-"
