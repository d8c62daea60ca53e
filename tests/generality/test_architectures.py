"""Generality suite (issue 10 item 7): real `transformers` architectures, random init, exported
with torch.onnx.export (opset 23) with sdpa attention (transformers' default) and eager, at batch
1 and 2. Each is compiled as `effc compile --target llvm` does (default passes, llvm build), its
output compared with ONNX Runtime on the exported file, its kernels checked to be on a real rule
and its passes checked to apply or refuse with the right reason.

tools/generality_sweep.py prints the same cases as a table with latencies.
"""

from __future__ import annotations

import pytest

from tests.generality.architectures import ARCHITECTURES
from tests.devices import requires_avx512_bf16, requires_vnni
from tests.generality.check import (BF16_RULE, INT8_RULE, TOLERANCE, Case, all_cases, compile_case,
                                    export_case)

CASES = all_cases()
# bf16 and int8 on a few cases of different patterns (the sweep, tools/generality_sweep.py
# --precision bf16,int8, runs all of them): a ViT (patch conv, ONNX Attention op), BERT (padding
# mask, post-LN), a LLaMA decoder (RMSNorm, rotary, causal eager attention), a ResNet (convs).
LOW_PRECISION_CASES = [Case("vit", "sdpa", 2), Case("bert", "sdpa", 2), Case("llama", "eager", 2),
                       Case("resnet", "default", 2)]
LOW_PRECISIONS = ("bf16", "int8")

class Suite:
    """Exports and builds shared by every test of a session (each done at most once)."""

    def __init__(self, root):
        self.root = root
        self._exported, self._outcomes = {}, {}

    def exported(self, case: Case):
        if case not in self._exported:
            self._exported[case] = export_case(case, self.root / "onnx")
        return self._exported[case]

    def outcome(self, case: Case, precision: str = "fp32"):
        if (case, precision) not in self._outcomes:
            self._outcomes[case, precision] = compile_case(self.exported(case),
                                                           self.root / "build" / f"{case.id}-{precision}", precision)
        return self._outcomes[case, precision]


@pytest.fixture(scope="session")
def suite(tmp_path_factory):
    return Suite(tmp_path_factory.mktemp("generality"))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_export_is_what_the_case_says(suite, case):
    """The suite's premise: ONNX Runtime runs the export like torch, and sdpa became the Attention op."""
    from effc.verify import OrtRunner, deviation

    exported = suite.exported(case)
    got = OrtRunner(exported.path)(exported.feed)["output"]
    assert got.shape[0] == case.batch
    assert deviation([{"o": got}], [{"o": exported.torch_output}]).max_rel <= TOLERANCE
    assert ("Attention" in exported.ops) == (case.impl == "sdpa")
    if "attention_mask" in exported.feed:  # the padded sequence must see its mask
        assert exported.feed["attention_mask"].min() == 0


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_compiled_module_matches_onnx_runtime(suite, case):
    outcome = suite.outcome(case)
    assert outcome.error is None, outcome.error
    assert outcome.max_rel <= TOLERANCE, f"max_rel {outcome.max_rel:.3g} against ONNX Runtime"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_every_kernel_is_on_a_real_rule(suite, case):
    """No kernel unscheduled or left to the fallback rule (data movement and elementwise math have
    the elementwise rule; convs, pools, norms, matmuls and reductions their own)."""
    outcome = suite.outcome(case)
    assert outcome.error is None, outcome.error
    left = {k: r for k, r in outcome.kernels.items() if r in ("fallback", "unscheduled")}
    assert outcome.kernels and not left, left


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_passes_apply_or_refuse_with_the_right_reason(suite, case):
    exported = suite.exported(case)
    records = {r.name: r for r in suite.outcome(case).records}
    assert set(records) == {"fold-batchnorm", "layernorm-to-rmsnorm"}
    check_fold_batchnorm(case, exported.ops, records["fold-batchnorm"])
    check_layernorm_to_rmsnorm(case, exported.ops, records["layernorm-to-rmsnorm"])


def _low(precision):
    return [pytest.param(c, precision, id=f"{c.id}-{precision}") for c in LOW_PRECISION_CASES]


@pytest.mark.parametrize("case, precision", _low("bf16") + _low("int8"))
def test_low_precision_module_matches_onnx_runtime(suite, case, precision):
    """bf16: against ONNX Runtime fp32 within bf16's bounds; int8 (ONNX Runtime's quantize_static QDQ
    copy): against ONNX Runtime on that file within twice its own int8 rounding, and exactly what the
    QDQ graph as written computes up to a step flipped here and there."""
    outcome = suite.outcome(case, precision)
    assert outcome.error is None, outcome.error
    assert outcome.ok, (f"max_rel {outcome.max_rel:.3g} (bound {outcome.bound:.3g}), cosine {outcome.cosine:.6f} "
                        f"against ONNX Runtime")
    if precision == "int8":
        assert outcome.vs_written <= outcome.bound, outcome.vs_written


@requires_avx512_bf16
@pytest.mark.parametrize("case, precision", _low("bf16"))
def test_bf16_build_takes_the_bf16_rule(suite, case, precision):
    """Every matmul and conv GEMM kernel on the bf16 rule; what stays fp32 is the window rule's
    convs (ResNet's stem, a few input channels: direct; depthwise convs)."""
    outcome = suite.outcome(case, precision)
    assert outcome.built_precision == "bf16"
    assert BF16_RULE in outcome.kernels.values(), outcome.kernels
    off = outcome.off_low_precision()
    assert not [k for k, where in off.items() if {"matmul", "conv_gemm"} & set(where.split(": ")[1].split(","))], off


@requires_vnni
@pytest.mark.parametrize("case, precision", _low("int8"))
def test_int8_build_takes_every_qdq_matmul(suite, case, precision):
    """Every MatMul/Gemm/Conv the QDQ graph quantizes runs on the int8 kernels (ResNet's convs and a
    ViT's patch conv included); only grouped/depthwise convs may stay float (said)."""
    outcome = suite.outcome(case, precision)
    off = outcome.off_low_precision()
    assert not [n for n, where in off.items() if not where.startswith("float: Conv: a grouped")], off
    assert INT8_RULE in outcome.kernels.values()


def check_fold_batchnorm(case, ops, record):
    if case.arch == "levit":  # Linear + BatchNorm1d (through flatten / reshape) everywhere
        assert ops.get("BatchNormalization", 0) > 0
        assert record.status == "applied", [s.reason for s in record.skipped]
        assert "BatchNormalization" not in record.ops_after and not record.skipped
    else:  # torch's exporter already folds Conv + BatchNorm2d (ResNet): nothing is left to fold
        assert "BatchNormalization" not in ops
        assert record.status == "skipped" and not record.skipped


# What layernorm-to-rmsnorm must say when it refuses, per architecture
# (stream-start norms themselves convert: CLIP's pre_layrnorm, Swin's and ConvNeXt's patch norms)
_REFUSAL = {"bert": ["post-LN"], "distilbert": ["post-LN"],
            "whisper-encoder": ["(Gelu) cannot be recentred"],  # the stream starts at gelu(conv)
            "clip-vision": ["without a LayerNorm"],  # the last block's stream is an output, read un-normed
            "swin": ["concatenates along the hidden axis"],  # patch merging
            "convnext": ["grouped convolution"]}  # a depthwise conv feeds the block norm


def check_layernorm_to_rmsnorm(case, ops, record):
    norms = ARCHITECTURES[case.arch].norms
    reasons = [s.reason for s in record.skipped]
    if norms == "pre-ln" and case.arch not in _REFUSAL:  # ViT, DeiT, GPT-2
        assert record.status == "applied", reasons
        assert "LayerNormalization" not in record.ops_after
        assert record.ops_after.get("RMSNormalization", 0) == ops["LayerNormalization"]
    elif norms in ("rms", "none"):
        assert "LayerNormalization" not in ops
        assert record.status == "skipped" and not reasons
    else:
        assert record.status == "skipped" and reasons
        for expected in _REFUSAL[case.arch]:
            assert any(expected in r for r in reasons), (expected, reasons)
        if norms != "post-ln":  # a stream that starts at a stem LayerNorm is not post-LN
            assert not any("post-LN" in r for r in reasons), reasons


def test_compute_ops_are_read_from_kernel_names():
    from tests.generality.check import Outcome, compute_ops, off_rule_summary

    assert compute_ops("fused_conv2d1_add1_relu11") == ["conv2d"]
    assert compute_ops("max_pool2d1") == ["max_pool2d"]
    assert compute_ops("fused_reshape1_batch_norm_reshape2_split1") == ["batch_norm"]
    assert compute_ops("fused_reshape_transpose_strided_slice_tir_negative_concatenate") == []
    assert compute_ops("fused_maximum_where1") == []
    outcome = Outcome(kernels={"matmul3": "matmul", "take1": "fallback", "conv1d1": "fallback",
                               "add2": "unscheduled"})
    assert outcome.off_rule() == {"conv1d1": "fallback: conv1d", "add2": "unscheduled: injective"}
    assert off_rule_summary(outcome) == "conv1d x1 (fallback), injective x1 (unscheduled); injective x1 (fallback)"


def test_what_fell_off_the_low_precision_kernels_is_read_from_the_build():
    from tests.generality.check import Outcome, off_low_precision_summary

    bf16 = Outcome(precision="bf16", kernels={"fused_conv_gemm1_add3_relu2": "matmul",
                                              "fused_matmul2_add": "matmul-bf16", "fused_conv2d_add_relu1": "window",
                                              "fused_matmul3": "gemv", "layer_norm1": "reduction"})
    assert off_low_precision_summary(bf16) == "conv2d x1 (window); conv_gemm x1 (matmul); matmul x1 (gemv)"
    int8 = Outcome(precision="int8", quantized_ops={"c1": "Conv", "c2": "Conv", "m1": "MatMul", "m2": "MatMul"},
                   custom_ops=[{"node": "m1", "lowering": "float (DQ folded)", "reason": "weight of rank 3"},
                               {"node": "m2", "lowering": "int8-vnni", "reason": ""}])
    assert off_low_precision_summary(int8) == ("Conv x2 (float: no int8 lowering for Conv); "
                                               "MatMul x1 (float: weight of rank 3)")
    assert off_low_precision_summary(Outcome(kernels={"fused_matmul1": "matmul"})) == "-"  # fp32: nothing is off


def test_the_suite_covers_what_issue_10_asks():
    arches = {c.arch for c in CASES}
    assert len(arches) >= 13
    assert {c.batch for c in CASES} == {1, 2}
    assert {c.impl for c in CASES} == {"sdpa", "eager", "default"}
    assert Case("qwen2", "sdpa", 2) in CASES and Case("swin", "eager", 1) in CASES  # GQA; windows at batch 1
