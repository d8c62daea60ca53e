"""Shipped tuning records: valid files, applied by default on their CPU family, `none` turns them off."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from effc.codegen import records as rec
from effc.frontend.onnx import from_proto
from tests.helpers import tiny_mlp_proto

pytest.importorskip("tvm")


def test_shipped_files_are_valid_records():
    from effc.codegen.schedules.cpu.matmul import Matmul

    files = sorted(rec.TUNED_DIR.glob("*.json"))
    assert files, "effc ships records for at least one CPU family"
    for path in files:
        data = json.loads(path.read_text())
        assert data["format"] == "effc-records-1" and data["records"], path
        for key, record in data["records"].items():
            assert key.startswith(f"{path.stem}/"), (path, key)  # keyed by the file's CPU family
            assert record["rule"] == "matmul" and record["ms"] > 0, (path, key)
            assert all(record["knobs"][k] in values for k, values in Matmul.KNOBS.items()), (path, key)


def _records_for_every_matmul(model, target) -> dict:
    """Records whose knobs differ from the rule defaults, one per matmul workload of ``model``."""
    from effc.codegen.build import front_half
    from effc.codegen.target import llvm_target

    _, kernels, _ = front_half(model, llvm_target(), target)  # the kernels as compile_model schedules them
    return {rec.workload_key(f, target): {"rule": "matmul", "knobs": {"mr": 4, "nr_vectors": 1}, "ms": 1.0,
                                          "kernel": gv.name_hint, "trials": 1}
            for gv, f in kernels.functions_items() if "matmul" in gv.name_hint}


def test_compile_applies_shipped_records_unless_none(tmp_path, monkeypatch):
    from effc.codegen.build import compile_model
    from effc.codegen.target import llvm_target

    model = from_proto(tiny_mlp_proto())
    target = llvm_target().tvm()
    records = _records_for_every_matmul(model, target)
    assert records
    monkeypatch.setattr(rec, "TUNED_DIR", tmp_path / "tuned")
    rec.save_records(tmp_path / "tuned" / f"{rec.cpu_family(target)}.json", records)

    compile_model(model, "llvm", tmp_path / "shipped")  # the default: shipped records
    manifest = json.loads((tmp_path / "shipped" / "codegen.json").read_text())
    assert manifest["records"] == f"shipped:{rec.cpu_family(target)}.json"
    assert manifest["tuned_kernels"] == len(records)

    compile_model(model, "llvm", tmp_path / "none", records="none")
    manifest = json.loads((tmp_path / "none" / "codegen.json").read_text())
    assert manifest["records"] is None and manifest["tuned_kernels"] == 0


def test_other_cpu_family_gets_no_shipped_records(tmp_path, monkeypatch):
    from effc.codegen.target import llvm_target

    monkeypatch.setattr(rec, "TUNED_DIR", tmp_path)
    rec.save_records(tmp_path / "some-other-cpu.json", {"some-other-cpu/0": {}})
    assert rec.resolve_records(rec.SHIPPED, llvm_target().tvm()) == ({}, None)


def test_cli_refuses_a_missing_record_file(tmp_path):
    onnx.save(tiny_mlp_proto(), tmp_path / "tiny.onnx")
    proc = subprocess.run([sys.executable, "-m", "effc.cli", "compile", str(tmp_path / "tiny.onnx"), "-o",
                           str(tmp_path / "out"), "--target", "llvm", "--records", str(tmp_path / "nope.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "--records: no such file" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
