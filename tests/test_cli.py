"""CLI behaviour: exit codes, one-line errors, outputs written, reports readable."""

from __future__ import annotations

import json
import subprocess

import onnx
import pytest

from tests.helpers import effc, tiny_mlp_proto


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_garbage_bytes_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x13\x37 definitely not protobuf \xff\xfe" * 50)
    line = _one_line_error(effc("compile", bad, "-o", tmp_path / "out"))
    assert "not an ONNX model" in line
    assert not (tmp_path / "out").exists()


def test_truncated_model_exit_2(tiny_onnx, tmp_path):
    data = tiny_onnx.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) - 37])
    _one_line_error(effc("compile", cut, "-o", tmp_path / "out"))


def test_unknown_pass_exit_2(tiny_onnx, tmp_path):
    line = _one_line_error(effc("compile", tiny_onnx, "-o", tmp_path / "out", "--passes", "fold-batchnorm,nope"))
    assert "unknown pass 'nope'" in line


def test_missing_file_exit_2(tmp_path):
    line = _one_line_error(effc("compile", tmp_path / "missing.onnx", "-o", tmp_path / "out"))
    assert "no such file" in line


def test_checker_failure_exit_2(tmp_path):
    proto = tiny_mlp_proto()
    proto.graph.node[1].input[0] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save(proto, path)
    line = _one_line_error(effc("compile", path, "-o", tmp_path / "out"))
    assert "checker" in line


def test_compile_writes_model_and_report(tiny_onnx, tmp_path):
    before = tiny_onnx.read_bytes()
    out = tmp_path / "out"
    proc = effc("compile", tiny_onnx, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert tiny_onnx.read_bytes() == before  # input never modified
    onnx.checker.check_model(onnx.load(out / "model.onnx"))
    report = json.loads((out / "report.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names == ["fold-batchnorm", "layernorm-to-rmsnorm"]
    for p in report["passes"]:
        assert p["status"] == "skipped" and p["rewrites"] == []
        for key in ("exact", "skipped", "ops_before", "ops_after", "params_before", "params_after",
                    "flops_before", "flops_after", "error", "seconds"):
            assert key in p
    inspect = effc("inspect", out)
    assert inspect.returncode == 0 and "fold-batchnorm" in inspect.stdout


def test_diff_identical_and_changed(tiny_onnx, tmp_path):
    proc = effc("diff", tiny_onnx, tiny_onnx)
    assert proc.returncode == 0 and "identical" in proc.stdout
    proto = tiny_mlp_proto()
    proto.graph.node[2].op_type = "Sigmoid"
    other = tmp_path / "other.onnx"
    onnx.save(proto, other)
    proc = effc("diff", tiny_onnx, other)
    assert proc.returncode == 0
    assert "Relu" in proc.stdout and "Sigmoid" in proc.stdout


def test_passes_lists_each_pass():
    proc = effc("passes")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("fold-batchnorm") and "exact" in line for line in lines)
    assert any(line.startswith("layernorm-to-rmsnorm") for line in lines)


def test_unknown_zoo_model_exit_2(tmp_path):
    line = _one_line_error(effc("zoo", "build", "nope", "-o", tmp_path / "x.onnx"))
    assert "unknown zoo model" in line


@pytest.mark.parametrize("args", [["compile"], ["frobnicate"]])
def test_usage_errors_exit_2(args):
    proc = effc(*args)
    assert proc.returncode == 2


def test_passes_none_copies_the_model(tiny_onnx, tmp_path):
    out = tmp_path / "out"
    proc = effc("compile", tiny_onnx, "-o", out, "--passes", "none")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["passes"] == []
    assert "identical" in effc("diff", tiny_onnx, out / "model.onnx").stdout


def test_empty_pass_list_exit_2(tiny_onnx, tmp_path):
    line = _one_line_error(effc("compile", tiny_onnx, "-o", tmp_path / "out", "--passes", ","))
    assert "--passes is empty" in line


def test_zoo_calib_writes_the_models_own_set(tmp_path):
    """Without --count a sentence encoder's set is every calibration sentence (one per sample);
    --count takes that many; the .npz holds one array per model input, samples first."""
    import numpy as np

    from effc.calib import calibration_texts
    from effc.zoo import get

    full = tmp_path / "all.npz"
    proc = effc("zoo", "calib", "minilm-l6", "-o", str(full))
    assert proc.returncode == 0, proc.stderr
    expected = len(calibration_texts(get("minilm-l6"), None, 0))
    with np.load(full) as data:
        assert set(data.files) == {"input_ids", "attention_mask"}
        assert len(data["input_ids"]) == expected > 64
    some = tmp_path / "some.npz"
    assert effc("zoo", "calib", "minilm-l6", "-o", str(some), "--count", "10").returncode == 0
    with np.load(some) as data:
        assert len(data["input_ids"]) == 10


def test_zoo_calib_beyond_vit_digits_validation_pool_exits_2(tmp_path):
    # Repeated images could sit both in the fit part and in the budget's held-out quarter: refused, not resampled.
    out = tmp_path / "calib.npz"
    line = _one_line_error(effc("zoo", "calib", "vit-digits", "-o", str(out), "--count", "300"))
    assert "vit-digits has 288 validation images to calibrate on; asked for 300" in line and not out.exists()


def test_zoo_calib_beyond_gpt_text_validation_windows_exits_2(tmp_path):
    out = tmp_path / "calib.npz"
    line = _one_line_error(effc("zoo", "calib", "gpt-text", "-o", str(out), "--count", "2049"))
    assert "gpt-text has 2048 validation windows to calibrate on; asked for 2049" in line and not out.exists()
