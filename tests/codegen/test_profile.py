"""`effc bench --profile`: per-kernel times with the rule that scheduled each kernel, and kernels no
rule took shown as "unscheduled" (in the manifest, the profile and the CLI output)."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from effc.frontend.onnx import from_proto
from tests.codegen.blocks import transformer_block_proto

pytest.importorskip("tvm")


def test_profile_names_rules_and_unscheduled_kernels(tmp_path):
    from effc.codegen.build import compile_model, load_compiled
    from effc.codegen.profile import profile
    from effc.codegen.schedules.cpu.matmul import Matmul
    from effc.verify import make_inputs

    model = from_proto(transformer_block_proto())
    result = compile_model(model, "llvm", tmp_path, rules=[Matmul()])  # no fallback: some left over
    unscheduled = {k for k, rule in result.kernels.items() if rule == "unscheduled"}
    assert unscheduled and result.rule_hits["unscheduled"] == len(unscheduled)
    assert json.loads((tmp_path / "codegen.json").read_text())["kernels"] == result.kernels
    rows, wall_ms = profile(load_compiled(tmp_path), make_inputs(model, 1)[0], runs=2)
    assert wall_ms > 0 and abs(sum(r.share for r in rows) - 1) < 1e-6
    rules = {r.name: r.rule for r in rows}
    assert any(rule == "matmul" for rule in rules.values()) and unscheduled & set(rules), rules


def test_cli_bench_profile(tmp_path):
    onnx.save(transformer_block_proto(), tmp_path / "block.onnx")
    out = tmp_path / "out"
    run = lambda *a: subprocess.run([sys.executable, "-m", "effc.cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    assert run("compile", tmp_path / "block.onnx", "-o", out, "--target", "llvm").returncode == 0
    proc = run("bench", out, "--runs", "2", "--warmup", "1", "--profile", "--top", "3", "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    assert "share" in proc.stdout and "matmul" in proc.stdout and "by rule" in proc.stdout, proc.stdout
    assert "unscheduled kernels" not in proc.stdout  # the default rules leave none
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["profile"] and {"name", "rule", "calls", "ms", "share"} <= set(report["profile"][0])
