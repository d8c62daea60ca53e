"""report.json: structured rewrites and per-layer records, rendered to text only by effc.report,
old string rewrites still readable, and `effc inspect --layers` worst layer first."""

from __future__ import annotations

import json
import subprocess
import sys

from effc.frontend.onnx import from_proto
from effc.passes import get_pass
from effc.passes.base import Rewrite
from effc.pipeline import run_pipeline
from effc.report import layer_rows, load_report, render_rewrite, write_report
from tests.passes.shift_add_models import feeds, mlp


def test_every_rewrite_action_renders_and_old_strings_pass_through():
    assert render_rewrite("BatchNormalization 'bn' -> MatMul 'fc' (after)") == \
        "BatchNormalization 'bn' -> MatMul 'fc' (after)"
    rewrite = Rewrite("bn", "fold-after", {"site": "BatchNormalization 'bn'", "repbn": False, "into": "fc",
                                           "into_op": "MatMul"})
    assert render_rewrite(rewrite) == "BatchNormalization 'bn' -> MatMul 'fc' (after)"
    as_json = json.loads(json.dumps({"node": "c", "action": "recentre",
                                     "details": {"op": "Gemm", "roles": [{"role": "weight", "zeroed": False},
                                                                         {"role": "bias", "zeroed": True}]}}))
    assert render_rewrite(as_json) == "recentred Gemm 'c' weight and bias (zeroed: the same for every channel)"
    # An action this version does not know (a newer report) still renders, with its details.
    assert render_rewrite({"node": "q", "action": "quantize", "details": {"bits": 4}}) == "q: quantize (bits=4)"


def _shift_add_report(tmp_path):
    model = from_proto(mlp())
    result = run_pipeline(model, [get_pass("shift-add")], feeds=feeds(2, seed=9),
                          options={"shift-add": {"layers": "fc*", "bits": 2}}, calibration=feeds())
    path = tmp_path / "report.json"
    write_report(path, "mlp", result.records)
    return path


def test_report_json_carries_structured_rewrites_and_layer_records(tmp_path):
    report = load_report(_shift_add_report(tmp_path))
    shift_add = report["passes"][0]
    assert shift_add["status"] == "applied"
    assert [(r["node"], r["action"], r["details"]["bits"]) for r in shift_add["rewrites"]] == \
        [("fc0", "shift-add", 2), ("fc1", "shift-add", 2), ("fc2", "shift-add", 2)]
    layers = {layer["node"]: layer for layer in shift_add["layers"]}
    assert set(layers) == {"fc0", "fc1", "fc2"}
    for layer in layers.values():
        assert 0 < layer["rel_error"] < 1 and 0 < layer["cosine"] < 1
        assert layer["bytes_after"] < layer["bytes_before"]
    rows = layer_rows(report)
    assert [r["cosine"] for r in rows] == sorted(r["cosine"] for r in rows)


def test_inspect_layers_lists_the_worst_layer_first(tmp_path):
    report = {"model": "m", "passes": [
        {"name": "shift-add", "status": "applied", "rewrites": [], "skipped": [], "layers": [
            {"node": "mild", "rel_error": 0.01, "cosine": 0.9999, "bytes_before": 4000, "bytes_after": 500,
             "data": "calibration (8 samples)"},
            {"node": "worst", "rel_error": 0.4, "cosine": 0.91, "bytes_before": 4000, "bytes_after": 500,
             "data": "calibration (8 samples)"},
            {"node": "middle", "rel_error": 0.1, "cosine": 0.99, "bytes_before": 4000, "bytes_after": 500,
             "data": "calibration (8 samples)"}]}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    proc = subprocess.run([sys.executable, "-m", "effc.cli", "inspect", str(path), "--layers"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    positions = [proc.stdout.index(name) for name in ("worst", "middle", "mild")]
    assert positions == sorted(positions), proc.stdout
    assert "0.910000" in proc.stdout and "8.00x" in proc.stdout


def test_inspect_layers_without_a_lossy_pass_says_so(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"model": "m", "passes": [{"name": "fold-batchnorm", "status": "skipped",
                                                          "rewrites": ["an old string rewrite"], "skipped": []}]}))
    proc = subprocess.run([sys.executable, "-m", "effc.cli", "inspect", str(path), "--layers"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "no per-layer records" in proc.stdout, proc.stderr
    plain = subprocess.run([sys.executable, "-m", "effc.cli", "inspect", str(path)], capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0 and "an old string rewrite" in plain.stdout, plain.stderr
