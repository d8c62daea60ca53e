"""Issue-level acceptance on the zoo models: exact passes on real architectures, refusals on post-LN."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from effc import zoo
from effc.diff import diff_models
from effc.frontend.onnx import load
from effc.passes import get_pass
from effc.pipeline import run_pipeline
from effc.verify import OrtRunner
from effc.zoo.cache import cached_model_path


def _compile(name: str, pass_name: str):
    original = load(cached_model_path(name))
    feeds = zoo.get(name).sample_inputs(2, 0)
    result = run_pipeline(load(cached_model_path(name)), [get_pass(pass_name)], feeds=feeds)
    return original, result


@pytest.mark.parametrize("name", ["vit-s16", "gpt2"])
def test_layernorm_to_rmsnorm_is_exact_on_pre_ln_models(name):
    original, result = _compile(name, "layernorm-to-rmsnorm")
    rec = result.records[0]
    assert rec.status == "applied", rec.skipped
    n_ln = rec.ops_before["LayerNormalization"]
    assert "LayerNormalization" not in rec.ops_after
    assert rec.ops_after["RMSNormalization"] == n_ln
    assert rec.error["max_rel"] <= 1e-4


@pytest.mark.parametrize("name", ["minilm-l6", "bert-base"])
def test_layernorm_to_rmsnorm_refuses_post_ln(name):
    original, result = _compile(name, "layernorm-to-rmsnorm")
    rec = result.records[0]
    assert rec.status == "skipped" and rec.rewrites == []
    assert rec.skipped and all("post-LN" in s.reason for s in rec.skipped)
    assert diff_models(original, result.model).identical


def test_fold_batchnorm_on_deit_repbn():
    _, result = _compile("deit-tiny-repbn", "fold-batchnorm")
    rec = result.records[0]
    assert rec.status == "applied"
    assert rec.ops_before["BatchNormalization"] > 0 and "BatchNormalization" not in rec.ops_after
    assert rec.error["max_rel"] <= 1e-4


def test_vit_digits_top1_unchanged_via_cli(tmp_path):
    src = cached_model_path("vit-digits")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "effc.cli"]
    proc = subprocess.run(cmd + ["compile", str(src), "-o", str(out), "--passes", "layernorm-to-rmsnorm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["status"] == "applied" and report["passes"][0]["error"]["max_rel"] <= 1e-4
    scores = {}
    for label, path in (("before", src), ("after", out / "model.onnx")):
        js = tmp_path / f"{label}.json"
        proc = subprocess.run(cmd + ["eval", str(path), "--zoo", "vit-digits", "--json", str(js)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        scores[label] = json.loads(js.read_text())
    assert scores["before"]["metric"] == "top1" and scores["before"]["value"] >= 0.93
    assert scores["after"]["value"] == scores["before"]["value"]


def test_gpt_text_perplexity_unchanged():
    module = zoo.get("gpt-text")
    original, result = _compile("gpt-text", "layernorm-to-rmsnorm")
    assert result.records[0].status == "applied"
    _, before = module.evaluate(OrtRunner(original))
    _, after = module.evaluate(OrtRunner(result.model))
    sig3 = lambda v: float(f"{v:.3g}")  # noqa: E731
    assert sig3(before) == sig3(after) and math.isfinite(before)
