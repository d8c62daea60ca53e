"""Issue-level acceptance on the zoo models: exact passes on real architectures, refusals on post-LN.

The pipeline already rolls back an exact pass that strays from ONNX Runtime on its own inputs, so
an "applied" status says nothing about accuracy by itself: each test here checks the rewritten
model against the original in ONNX Runtime on inputs the pipeline never saw, and the rewrites
against the graph (every site converted, none left)."""

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
from effc.verify import OrtRunner, deviation
from effc.zoo.cache import cached_model_path
from tests.helpers import zoo_params

EXACT = 1e-4  # scale-relative deviation of an exact pass (fp32)


def _compile(name: str, pass_name: str):
    original = load(cached_model_path(name))
    feeds = zoo.get(name).sample_inputs(2, 0)
    result = run_pipeline(load(cached_model_path(name)), [get_pass(pass_name)], feeds=feeds)
    return original, result


def _held_out_deviation(name: str, original, rewritten) -> float:
    """max_rel of ``rewritten`` against ``original`` in ONNX Runtime on inputs other than the pipeline's."""
    feeds = zoo.get(name).sample_inputs(2, 1)
    return deviation(OrtRunner(rewritten).run_all(feeds), OrtRunner(original).run_all(feeds)).max_rel


@pytest.mark.parametrize("name", zoo_params("vit-s16", "gpt2"))
def test_layernorm_to_rmsnorm_is_exact_on_pre_ln_models(name):
    original, result = _compile(name, "layernorm-to-rmsnorm")
    rec = result.records[0]
    assert rec.status == "applied", rec.skipped
    n_ln = rec.ops_before["LayerNormalization"]
    assert "LayerNormalization" not in rec.ops_after
    assert rec.ops_after["RMSNormalization"] == n_ln
    assert sum(r.action == "to-rms" for r in rec.rewrites) == n_ln
    assert _held_out_deviation(name, original, result.model) <= EXACT


@pytest.mark.parametrize("name", zoo_params("minilm-l6", "bert-base"))
def test_layernorm_to_rmsnorm_refuses_post_ln(name):
    original, result = _compile(name, "layernorm-to-rmsnorm")
    rec = result.records[0]
    assert rec.status == "skipped" and rec.rewrites == []
    assert rec.skipped and all("post-LN" in s.reason for s in rec.skipped)
    assert diff_models(original, result.model).identical


def test_fold_batchnorm_on_deit_repbn():
    original, result = _compile("deit-tiny-repbn", "fold-batchnorm")
    rec = result.records[0]
    assert rec.status == "applied"
    assert rec.ops_before["BatchNormalization"] > 0 and "BatchNormalization" not in rec.ops_after
    bns = {node.name for node in original.graph if node.op_type == "BatchNormalization"}
    assert {r.node for r in rec.rewrites} == bns and rec.skipped == []  # every BN folded, each recorded
    assert _held_out_deviation("deit-tiny-repbn", original, result.model) <= EXACT


def test_vit_digits_top1_unchanged_via_cli(tmp_path):
    src = cached_model_path("vit-digits")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "effc.cli"]
    proc = subprocess.run(cmd + ["compile", str(src), "-o", str(out), "--passes", "layernorm-to-rmsnorm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    n_ln = sum(node.op_type == "LayerNormalization" for node in load(src).graph)
    assert n_ln and sum(r["action"] == "to-rms" for r in report["passes"][0]["rewrites"]) == n_ln
    assert _held_out_deviation("vit-digits", load(src), load(out / "model.onnx")) <= EXACT
    scores = {}
    for label, path in (("before", src), ("after", out / "model.onnx")):
        js = tmp_path / f"{label}.json"
        proc = subprocess.run(cmd + ["eval", str(path), "--zoo", "vit-digits", "--json", str(js)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        scores[label] = json.loads(js.read_text())
    assert scores["before"]["metric"] == "top1" and scores["before"]["value"] >= 0.98
    assert scores["after"]["value"] == scores["before"]["value"]


def test_gpt_text_perplexity_unchanged():
    module = zoo.get("gpt-text")
    original, result = _compile("gpt-text", "layernorm-to-rmsnorm")
    assert result.records[0].status == "applied"
    _, before = module.evaluate(OrtRunner(original))
    _, after = module.evaluate(OrtRunner(result.model))
    sig3 = lambda v: float(f"{v:.3g}")  # noqa: E731
    assert sig3(before) == sig3(after) and math.isfinite(before)
