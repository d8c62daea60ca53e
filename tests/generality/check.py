"""One generality case end to end, as `effc compile --target llvm` runs it: load the exported ONNX
file, run the default pass list, build for llvm, then run the module and compare it with ONNX
Runtime on the exported file. Shared by tests/generality/test_architectures.py and
tools/generality_sweep.py.

Each case runs at a precision (PRECISIONS):
- fp32: the exported file as it is, against ONNX Runtime on it, within TOLERANCE;
- bf16: the same file built with `--precision bf16`, against ONNX Runtime fp32, within the bf16
  bounds below (BF16_MAX_REL, BF16_MIN_COSINE);
- int8: a QDQ copy as ONNX Runtime's quantize_static makes it (make_qdq), built as it is (effc lowers
  the QDQ matmuls to its integer kernels), against ONNX Runtime on that same QDQ file, within
  ONNX Runtime's own int8 rounding (INT8_ROUNDING_FACTOR, INT8_MIN_COSINE);
- int8-effc: the same with effc's own quantize pass making the QDQ copy (make_effc_qdq: w8a8, every
  linear, the first and last included)."""

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
PRECISIONS = ("fp32", "bf16", "int8", "int8-effc")
# bf16 keeps 8 significant bits: rounding an operand errs by up to u = 2^-8 (3.9e-3) relative, a
# product of two rounded operands by 2u. These models chain about 8 matmuls per output (embedding or
# patch projection, then q/k/v, q k^T, p v, out, fc1, fc2 in each of 2 layers, norms between them
# re-scaling the error, not shrinking it): 8 x 2u = 6.3e-2 if every rounding erred the same way at
# the worst element. A wrong kernel (a lost tile, a misread layout) errs by the output's own scale.
BF16_MAX_REL = 6e-2  # scale-relative, against ONNX Runtime fp32
BF16_MIN_COSINE = 0.999
# A QDQ model's output is defined only up to its rounding (effc.codegen.qdq_tolerance): effc's integer
# kernels are held, as `effc compile` holds them, to twice the larger of ONNX Runtime's own rounding (its
# fused integer kernels against the graph as written, on the same feed) and the graph's flip sensitivity
# (the graph as written with its QuantizeLinear scales moved by float-rounding amounts), and to a
# cosine no wrong kernel reaches.
INT8_ROUNDING_FACTOR = 2.0
INT8_MIN_COSINE = 0.99
CALIBRATION_FEEDS = 4  # random feeds of the case's shapes for quantize_static (MinMax)
# Ops whose kernels must land on a compute rule; a fallback-scheduled kernel made only of data
# movement and elementwise ops (reshape, transpose, take, where, add, ...) is what the fallback
# rule is for (parallel outer loops, vectorised inner loop).
_COMPUTE_OP = re.compile(r"(?:^|_)(conv[123]d(?:_transpose)?|(?:adaptive_)?(?:max|avg)_pool[123]d|"
                         r"(?:batch|layer|rms|group|instance)_norm|matmul|dense|softmax|sum|mean|variance|max|"
                         r"min|prod|attention|cumsum|argmax|argmin)(?=\d|_|$)")

# Kernels whose products the bf16 rule could compute (a conv as its GEMM after conv_gemm, or direct)
_GEMM_OP = re.compile(r"(?:^|_)(matmul|dense|conv_gemm|conv[123]d(?:_transpose)?)(?=\d|_|$)")


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
    precision: str = "fp32"  # the one asked for (PRECISIONS)
    built_precision: str = "fp32"  # the one effc took (bf16 asked on a CPU without it: fp32, said in built_note)
    built_note: str = ""
    cosine: float | None = None
    bound: float = TOLERANCE  # the max_rel allowed (int8: from ONNX Runtime's own rounding)
    ort_rounding: float | None = None  # int8: ONNX Runtime's fused kernels against the QDQ graph as written
    flips: float | None = None  # int8: the QDQ graph's flip sensitivity (effc.codegen.qdq_tolerance)
    vs_written: float | None = None  # int8: max_rel of the module against the QDQ graph as written (float ops)
    custom_ops: list = field(default_factory=list)  # how each QDQ / effc op node was lowered
    quantized_ops: dict[str, str] = field(default_factory=dict)  # int8: node -> op type of each QDQ conv/matmul

    @property
    def ok(self) -> bool:
        if self.error or self.max_rel is None:
            return False
        if self.precision == "bf16":
            return self.max_rel <= BF16_MAX_REL and self.cosine >= BF16_MIN_COSINE
        if self.precision.startswith("int8"):
            return self.max_rel <= self.bound and self.cosine >= INT8_MIN_COSINE
        return self.max_rel <= self.bound

    def off_rule(self) -> dict[str, str]:
        """Kernels on "unscheduled", and those on "fallback" that carry a compute op -> the op."""
        bad = {}
        for kernel, rule in self.kernels.items():
            if rule == "unscheduled":
                bad[kernel] = "unscheduled: " + (",".join(compute_ops(kernel)) or "injective")
            elif rule == "fallback" and compute_ops(kernel):
                bad[kernel] = "fallback: " + ",".join(compute_ops(kernel))
        return bad

    def off_low_precision(self) -> dict[str, str]:
        """What did not compute at the case's precision -> where it went. bf16: the matmul kernels
        not on the bf16 rule ("rule: ops"). int8: the convs and matmuls the QDQ graph quantizes
        (both operands through DequantizeLinear) that effc runs in float ("float: reason"); the float
        matmuls of the QDQ graph (e.g. inside an Attention op it left float) are no fall-off."""
        if self.precision == "bf16":
            return {k: f"{rule}: " + ",".join(ops) for k, rule in self.kernels.items()
                    if rule != BF16_RULE and (ops := _GEMM_OP.findall(k))}
        if not self.precision.startswith("int8"):
            return {}
        lowered = {op["node"]: op for op in self.custom_ops if "node" in op}
        off = {}
        for node, op_type in self.quantized_ops.items():
            how = lowered.get(node, {})
            if how.get("lowering") == QDQ_FLOAT:
                off[node] = f"float: {op_type}: {how.get('reason')}"
            elif not how:
                off[node] = f"float: {op_type}: no int8 lowering for {op_type}"
        return off


def compute_ops(kernel: str) -> list[str]:
    """The compute ops in a kernel's name (TVM names a fused kernel after its ops)."""
    return _COMPUTE_OP.findall(kernel)


BF16_RULE = "matmul-bf16"  # effc.codegen.schedules.cpu.matmul_bf16
INT8_RULE = "int8-matmul"  # effc.codegen.schedules.cpu.int8_matmul
QDQ_FLOAT = "float (DQ folded)"  # effc.codegen.qdq_lowering.FALLBACK


def export_case(case: Case, directory: Path) -> Exported:
    import onnx

    path, feed, expected = export(case.arch, case.attn, case.batch, directory / f"{case.id}.onnx")
    proto = onnx.load(path, load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return Exported(path, feed, expected, ops)


def calibration_feeds(feed: dict[str, np.ndarray], count: int = CALIBRATION_FEEDS, seed: int = 7):
    """``count`` random feeds shaped like ``feed``: token ids in the vocabulary, the case's own
    attention mask, N(0, 1) floats (pixels, mel features), none of them the checked feed."""
    from tests.generality.architectures import VOCAB

    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        one = {}
        for name, value in feed.items():
            if "mask" in name:
                one[name] = value.copy()
            elif np.issubdtype(value.dtype, np.integer):
                one[name] = rng.integers(1, VOCAB, size=value.shape).astype(value.dtype)
            else:
                one[name] = rng.standard_normal(value.shape).astype(value.dtype)
        feeds.append(one)
    return feeds


def make_qdq(exported: Exported) -> Path:
    """A QDQ copy of the exported file as ONNX Runtime's quantize_static makes it by default (every op
    type it quantizes; QDQ format, u8 activations, per-channel s8 weights, MinMax over
    calibration_feeds); written beside the export, reused when there."""
    import logging

    import onnxruntime.quantization as q

    path = exported.path.with_name(exported.path.stem + "-qdq.onnx")
    if path.exists():
        return path
    samples = iter(calibration_feeds(exported.feed))

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(samples, None)

    tmp = path.with_name(path.stem + ".tmp.onnx")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "please run pre-processing", "axis out of range" per norm
    try:
        q.quantize_static(str(exported.path), str(tmp), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
    finally:
        logging.getLogger().setLevel(level)
    tmp.rename(path)
    return path


def make_effc_qdq(exported: Exported) -> Path:
    """A QDQ copy of the exported file made by effc's quantize pass (w8a8, u8 activations, the first
    and last linears too, calibrated on calibration_feeds); written beside the export, reused when
    there. EffcError when the pass does not apply (its reason)."""
    from effc.errors import EffcError
    from effc.frontend.onnx import load
    from effc.ir import save
    from effc.passes import get_pass
    from effc.pipeline import run_pipeline

    path = exported.path.with_name(exported.path.stem + "-effcq.onnx")
    if path.exists():
        return path
    result = run_pipeline(load(exported.path), [get_pass("quantize")], feeds=[exported.feed],
                          options={"quantize": {"mode": "w8a8", "ends": True}},
                          calibration=calibration_feeds(exported.feed, 8))
    record = result.records[0]
    if record.status != "applied":
        reasons = "; ".join(s.reason for s in record.skipped[:2]) or record.note or record.status
        raise EffcError(f"effc's quantize pass did not apply: {reasons}")
    save(result.model, path)
    return path


def quantized_compute_ops(path: Path) -> dict[str, str]:
    """node name -> op type of each Conv / ConvTranspose / MatMul / Gemm of a QDQ file whose first
    two inputs both come out of a DequantizeLinear (what ONNX Runtime runs as an integer kernel)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name or f"{n.op_type}_{i}": n.op_type for i, n in enumerate(graph.node)
            if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and len(n.input) >= 2
            and n.input[0] in dequantized and n.input[1] in dequantized}


def run_as_written(path: Path, feeds: list[dict]) -> list[dict]:
    """ONNX Runtime with its graph optimisations off: a QDQ graph read as written (DequantizeLinear,
    then float ops), no integer kernels."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def compile_case(exported: Exported, out_dir: Path, precision: str = "fp32") -> Outcome:
    """Default passes, llvm build at ``precision``, run and compare; every failure is caught into the
    Outcome. int8 builds (and is compared on) the QDQ copy of make_qdq, int8-effc that of make_effc_qdq.

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

    outcome = Outcome(precision=precision, bound=BF16_MAX_REL if precision == "bf16" else TOLERANCE)
    feeds = [exported.feed]
    try:
        source = {"int8": make_qdq, "int8-effc": make_effc_qdq}.get(precision, lambda e: e.path)(exported)
        result = run_pipeline(load(source), parse_pass_list(None), feeds=feeds)
        outcome.records = result.records
        save(result.model, out_dir / "model.onnx")  # as `effc compile` writes it (`effc bench` reads it)
        built = compile_model(result.model, "llvm", out_dir, source=str(source),
                              precision="bf16" if precision == "bf16" else "fp32")
    except EffcError as exc:
        outcome.error = str(exc)
        return outcome
    except Exception as exc:  # effc's own fault: reported as such, the other cases still run
        outcome.error = f"crashed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        return outcome
    outcome.out_dir, outcome.kernels = built.out_dir, dict(built.kernels)
    outcome.built_precision, outcome.custom_ops = built.precision, list(built.custom_ops)
    outcome.rule_errors = json.loads((built.out_dir / "codegen.json").read_text()).get("rule_errors", [])
    outcome.built_note = built.precision_reason if precision == "bf16" and built.precision != "bf16" else ""
    try:
        got = [load_compiled(built.out_dir)(feed) for feed in feeds]
    except Exception as exc:
        outcome.error = f"the built module failed to run: {type(exc).__name__}: {str(exc).strip()[:200]}"
        return outcome
    dev = deviation(got, OrtRunner(source).run_all(feeds))
    outcome.max_rel, outcome.cosine = dev.max_rel, dev.cosine
    if precision.startswith("int8"):
        import onnx_ir as ir

        from effc.codegen.qdq_tolerance import flip_sensitivity, ort_rounding

        model = ir.load(str(source))
        outcome.ort_rounding, outcome.flips = ort_rounding(model, feeds), flip_sensitivity(model, feeds)
        outcome.vs_written = deviation(got, run_as_written(source, feeds)).max_rel
        outcome.quantized_ops = quantized_compute_ops(source)
        outcome.bound = max(TOLERANCE, INT8_ROUNDING_FACTOR * max(outcome.ort_rounding, outcome.flips))
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


def off_low_precision_summary(outcome: Outcome) -> str:
    """"conv_gemm x5 (matmul); Conv x1 (float: no int8 lowering for Conv)": what did not compute at
    the case's low precision (Outcome.off_low_precision), counted."""
    counts: dict[tuple[str, str], int] = {}
    for where in outcome.off_low_precision().values():
        rule, what = where.split(": ", 1)
        if rule == "float":  # "float: Conv: reason"
            what, reason = what.split(": ", 1)
            rule = f"float: {reason}"
        counts[what, rule] = counts.get((what, rule), 0) + 1
    return "; ".join(f"{what} x{n} ({rule})" for (what, rule), n in sorted(counts.items())) or "-"
