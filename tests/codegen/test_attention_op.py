"""The standard ONNX Attention op (opset 23/24) compiled by effc (effc.codegen.attention_lowering).

Each model is one Attention node built with onnx.helper; the compiled module must agree with ONNX
Runtime (which follows the op's reference here, fully masked rows included) at 1e-4 scale-relative
error on every output it writes. What the lowering cannot do exactly is refused with one line."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import onnx
import pytest

from effc.errors import EffcError
from effc.verify import OrtRunner, deviation
from tests.codegen.attention_models import Case, attention_feeds, attention_proto

pytest.importorskip("tvm")

TOL = 1e-4
MHA = dict(q=(2, 4, 13, 16), k=(2, 4, 13, 16), v=(2, 4, 13, 16))  # batch 2, 4 heads, 13 tokens

CASES = {
    "vit-197-tokens": Case((2, 3, 197, 32), (2, 3, 197, 32), (2, 3, 197, 32)),
    "3d-gqa-cross-present": Case((2, 13, 64), (2, 9, 32), (2, 9, 48), attrs=dict(q_num_heads=4, kv_num_heads=2),
                                 outputs=("Y", "present_key", "present_value")),
    "mqa-causal": Case((2, 4, 13, 16), (2, 1, 13, 16), (2, 1, 13, 8), attrs=dict(is_causal=1)),
    "bool-mask": Case(**MHA, mask=(2, 1, 13, 13)),
    "bool-mask-causal": Case(**MHA, mask=(2, 4, 13, 13), attrs=dict(is_causal=1)),
    "float-mask-causal": Case(**MHA, mask=(2, 1, 13, 13), mask_dtype="float", attrs=dict(is_causal=1)),
    "float-mask-3d": Case((2, 13, 64), (2, 13, 64), (2, 13, 64), mask=(13, 13), mask_dtype="float",
                          attrs=dict(q_num_heads=4, kv_num_heads=4)),
    "past-causal": Case((2, 4, 3, 16), (2, 4, 3, 16), (2, 4, 3, 16), attrs=dict(is_causal=1),
                        past=((2, 4, 10, 16), (2, 4, 10, 16)), outputs=("Y", "present_key", "present_value")),
    "past-3d-gqa-mask": Case((2, 3, 64), (2, 3, 32), (2, 3, 32), mask=(2, 1, 3, 11),
                             attrs=dict(q_num_heads=4, kv_num_heads=2),
                             past=((2, 2, 8, 16), (2, 2, 8, 16)), outputs=("Y", "present_key", "present_value")),
    "softcap-scale": Case(**MHA, attrs=dict(softcap=2.0, scale=0.3)),
    "qk-output-mode-0": Case(**MHA, outputs=("Y", "qk_matmul_output"), attrs=dict(qk_matmul_output_mode=0)),
    "softmax-precision": Case(**MHA, attrs=dict(softmax_precision=onnx.TensorProto.FLOAT)),
    "nonpad-causal-opset24": Case((2, 4, 5, 16), (2, 4, 13, 16), (2, 4, 13, 16), nonpad=True, opset=24,
                                  attrs=dict(is_causal=1)),
}


def _compile(proto, tmp_path, target="llvm", **kwargs):
    from effc.codegen.build import compile_model
    from effc.frontend.onnx import from_proto

    model = from_proto(proto)
    return model, compile_model(model, target, tmp_path, **kwargs)


def _agreement(case: Case, tmp_path, feeds=None) -> float:
    from effc.codegen.build import run_compiled

    proto = attention_proto(case)
    model, _ = _compile(proto, tmp_path)
    feeds = feeds or attention_feeds(case, 2, seed=1)
    got, want = run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds)
    assert all(set(g) == set(case.outputs) for g in got)
    return deviation(got, want).max_rel


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_ort(name, tmp_path):
    assert _agreement(CASES[name], tmp_path) < TOL


@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_fully_masked_rows_are_zero(mask_dtype, tmp_path):
    """A query row with no key attended is zero (not NaN), as the op and ONNX Runtime say; other rows
    are unaffected. nonpad_kv_seqlen < S_q with is_causal masks the leading rows the same way."""
    case = Case(**MHA, mask=(2, 1, 13, 13), mask_dtype=mask_dtype)
    feeds = attention_feeds(case, 2, seed=2)
    for feed in feeds:
        feed["mask"][0, 0, 3, :] = False if mask_dtype == "bool" else -np.inf
    assert _agreement(case, tmp_path, feeds) < TOL

    causal = Case((2, 4, 5, 16), (2, 4, 13, 16), (2, 4, 13, 16), nonpad=True, opset=24, attrs=dict(is_causal=1))
    feeds = attention_feeds(causal, 1)
    feeds[0]["nonpad"] = np.array([2, 13], np.int64)  # batch 0: rows 0..2 see no key
    assert _agreement(causal, tmp_path / "causal", feeds) < TOL


def test_short_mask_is_padded_like_the_reference(tmp_path):
    """A mask shorter than the keys is padded with "do not attend" (ONNX Runtime refuses such a mask,
    so the op's reference implementation is the judge)."""
    from onnx.reference import ReferenceEvaluator

    from effc.codegen.build import run_compiled

    for mask_dtype in ("bool", "float"):
        case = Case(**MHA, mask=(13, 9), mask_dtype=mask_dtype)
        proto = attention_proto(case)
        _compile(proto, tmp_path / mask_dtype)
        feeds = attention_feeds(case, 2, seed=3)
        want = [dict(zip(case.outputs, ReferenceEvaluator(proto).run(None, f))) for f in feeds]
        assert deviation(run_compiled(tmp_path / mask_dtype, feeds), want).max_rel < TOL


@pytest.mark.parametrize("case,reason", [
    (Case(**MHA, outputs=("Y", "qk_matmul_output"), attrs=dict(qk_matmul_output_mode=2)),
     "qk_matmul_output_mode 2 is not supported"),
    (Case(**MHA, outputs=("Y", "qk_matmul_output"), attrs=dict(softcap=5.0)), "qk_matmul_output with softcap"),
    (Case((2, 4, 13, 16), (2, 3, 13, 16), (2, 3, 13, 16)), "4 query heads are not a multiple of 3"),
    (Case((2, 13, 64), (2, 13, 30), (2, 13, 30), attrs=dict(q_num_heads=4, kv_num_heads=4)),
     "K has 30 features, not a multiple of 4 heads"),
])
def test_unsupported_forms_are_refused_by_name(case, reason, tmp_path, capsys):
    with pytest.raises(EffcError, match=reason) as info:
        _compile(attention_proto(case), tmp_path)
    assert "'attn'" in str(info.value) and "\n" not in str(info.value)
    assert capsys.readouterr().out == ""  # refused before TVM's importer, which prints its failures
    assert not (tmp_path / "model.so").exists()


def test_unused_qk_output_mode_is_not_refused(tmp_path):
    """The mode only shapes the optional qk_matmul_output: without that output any mode compiles."""
    assert _agreement(Case(**MHA, attrs=dict(qk_matmul_output_mode=3)), tmp_path) < TOL


def test_opset24_file_loads_and_compiles(tmp_path):
    from effc.codegen.build import compile_model, run_compiled
    from effc.frontend.onnx import load

    case = CASES["nonpad-causal-opset24"]
    onnx.save(attention_proto(case), tmp_path / "attn.onnx")
    model = load(tmp_path / "attn.onnx")
    assert model.opset_imports[""] == 24
    compile_model(model, "llvm", tmp_path / "out")
    feeds = attention_feeds(case, 1, seed=4)
    assert deviation(run_compiled(tmp_path / "out", feeds), OrtRunner(model).run_all(feeds)).max_rel < TOL


def test_cli_refusal_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from effc.cli import main

    bad = Case(**MHA, outputs=("Y", "qk_matmul_output"), attrs=dict(qk_matmul_output_mode=1))
    onnx.save(attention_proto(bad), tmp_path / "bad.onnx")
    monkeypatch.setattr(sys, "argv", ["effc", "compile", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "out"),
                                      "--passes", "none", "--target", "llvm"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    errors = [line for line in err.splitlines() if "error" in line]  # the pass table goes to stderr too
    assert errors == [
        "effc: error: Attention node 'attn': qk_matmul_output_mode 1 is not supported (only mode 0, the scaled Q*K^T)"]
    assert not (tmp_path / "out" / "model.so").exists()


def _torch_block(sdpa: bool, gqa: bool):
    """x[2, 13, 64] (and a bool key mask with gqa) -> 4 query heads of causal attention over
    x-derived q, k, v (2 key/value heads with gqa) -> + x, as torch writes it with
    scaled_dot_product_attention (sdpa) or with explicit matmul/softmax (eager). No linears: the
    matmul rule's batch > 1 linear bug (issue 10, item 2) is not this op's."""
    import torch

    class Block(torch.nn.Module):
        def forward(self, x, mask=None):
            b, s, _ = x.shape
            kv_heads = 2 if gqa else 4
            q = x.reshape(b, s, 4, 16).transpose(1, 2)
            k = (x[..., :kv_heads * 16] * 0.5).reshape(b, s, kv_heads, 16).transpose(1, 2)
            v = (x[..., :kv_heads * 16] + 1.0).reshape(b, s, kv_heads, 16).transpose(1, 2)
            allowed = torch.ones(s, s, dtype=torch.bool).tril()
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
            if sdpa:
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
            else:
                k, v = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
                scores = (q @ k.transpose(-1, -2)) * 0.25
                y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
            return y.transpose(1, 2).reshape(b, s, 64) + x

    return Block().eval()


def _export(module, path, gqa: bool):
    import torch

    torch.manual_seed(0)
    inputs = (torch.randn(2, 13, 64),) + ((torch.rand(2, 13) > 0.3) | (torch.arange(13) == 0),) * gqa
    torch.onnx.export(module, inputs, str(path), dynamo=True, opset_version=23, verbose=False)
    return path


@pytest.mark.parametrize("gqa", [False, True], ids=["causal", "gqa-key-mask"])
def test_torch_sdpa_export_compiles_like_its_eager_form(gqa, tmp_path):
    """torch.onnx.export(dynamo=True, opset_version=23) writes scaled_dot_product_attention as one
    Attention node; compiled, it matches ONNX Runtime and (without a mask, whose fully-masked-row
    guard is extra) takes the same rules as the eager (matmul/softmax) export of the same block."""
    pytest.importorskip("torch")
    from effc.codegen.build import compile_model, run_compiled
    from effc.frontend.onnx import load
    from effc.verify import make_inputs

    built = {}
    for style in ("sdpa", "eager") if not gqa else ("sdpa",):
        model = load(_export(_torch_block(style == "sdpa", gqa), tmp_path / f"{style}.onnx", gqa))
        ops = [n.op_type for n in model.graph]
        assert (ops.count("Attention") == 1) == (style == "sdpa"), ops
        result = compile_model(model, "llvm", tmp_path / style)
        feeds = make_inputs(model, 2, seed=5)
        for feed in feeds[1:]:
            if gqa:
                feed[model.graph.inputs[1].name][:, 5:] = False  # padded keys
        assert deviation(run_compiled(tmp_path / style, feeds), OrtRunner(model).run_all(feeds)).max_rel < TOL
        built[style] = result
    if not gqa:
        assert built["sdpa"].rule_hits == built["eager"].rule_hits, (built["sdpa"].kernels, built["eager"].kernels)
    assert "fallback" not in {rule for name, rule in built["sdpa"].kernels.items() if "matmul" in name}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA builds need it")
@pytest.mark.parametrize("name", ["3d-gqa-mask-causal", "mqa-causal"])
def test_cuda_build(name, tmp_path):
    """Build only (no GPU is needed to build) for sm_90: QK^T and PV on dlight's GPU matmul rule."""
    case = CASES.get(name) or Case((2, 13, 64), (2, 13, 32), (2, 13, 32), mask=(2, 1, 13, 13),
                                   attrs=dict(q_num_heads=4, kv_num_heads=2, is_causal=1))
    _, result = _compile(attention_proto(case), tmp_path, "cuda", arch="sm_90")
    assert result.rule_hits.get("Matmul", 0) >= 2, result.rule_hits
    assert b"_kernel" in (tmp_path / "model.so").read_bytes()
