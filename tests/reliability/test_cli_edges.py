"""The command-line rough edges a new user hits (issue 11, item 7)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import tiny_mlp_proto
from tests.reliability.common import ENV, effc, one_line_refusal, save_proto


def test_help_is_fast_and_imports_no_model_stack():
    code = "import sys, effc.cli; print(sorted(m for m in ('onnx', 'torch', 'tvm', 'onnxruntime') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    start = time.perf_counter()
    assert effc("--help").returncode == 0
    assert time.perf_counter() - start < 10  # ~0.3 s idle (2.6 s before); the machine is shared


def test_compile_prints_why_each_pass_did_nothing(tmp_path):
    src = save_proto(tiny_mlp_proto(), tmp_path / "tiny.onnx")
    proc = effc("compile", src, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "[fold-batchnorm] skipped: nothing to do: no candidate in this model" in proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"] == str(src)  # absolute: `eval` finds the original from anywhere
    assert all(p["note"].startswith("nothing to do") for p in report["passes"])
    proc = effc("inspect", tmp_path / "out")
    assert "[layernorm-to-rmsnorm] note: nothing to do" in proc.stdout


def test_diff_all_lists_every_initializer(tmp_path):
    base = tiny_mlp_proto()
    many = tiny_mlp_proto()
    for i in range(12):
        many.graph.initializer.append(numpy_helper.from_array(np.full(3, i, np.float32), f"extra{i:02d}"))
    a, b = save_proto(base, tmp_path / "a.onnx"), save_proto(many, tmp_path / "b.onnx")
    cut = effc("diff", a, b).stdout
    assert "initializers added (12)" in cut and "(+4; --all lists them)" in cut and "extra11" not in cut
    full = effc("diff", a, b, "--all").stdout
    assert all(f"extra{i:02d}" in full for i in range(12)) and "--all" not in full


def test_eval_zoo_name_and_side_by_side(tmp_path):
    proc = effc("eval", "zoo:vit-digits")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("top1: ")
    import shutil

    from effc.zoo.cache import cached_model_path

    out = tmp_path / "out"  # an OUT as `effc compile zoo:vit-digits -o out --passes none` writes it
    out.mkdir()
    shutil.copy(cached_model_path("vit-digits"), out / "model.onnx")
    (out / "report.json").write_text(json.dumps({"model": "zoo:vit-digits", "passes": []}))
    proc = effc("eval", out, "--json", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith("top1: baseline ") and " optimized " in line
    body = json.loads((tmp_path / "e.json").read_text())
    assert body["baseline_model"] == "zoo:vit-digits" and body["value"] == body["baseline"]  # the same model


def test_eval_needs_a_zoo_to_know_the_metric(tmp_path):
    src = save_proto(tiny_mlp_proto(), tmp_path / "tiny.onnx")
    assert "--zoo NAME" in one_line_refusal(effc("eval", src))


def test_zoo_build_help_names_the_file():
    text = effc("zoo", "build", "--help").stdout
    assert "into OUT" not in text and ".onnx file" in text


def _embedding() -> onnx.ModelProto:
    """ids[1,4] -> Gather from a [10,8] table -> MatMul: TVM warns about Gather's "fast mode"."""
    from onnx import TensorProto as T
    from onnx import helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", T.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8])], [table, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_build_log_keeps_tvm_off_the_console(tmp_path):
    """TVM's C++ warnings land in OUT/build.log, never on the console."""
    src = save_proto(_embedding(), tmp_path / "emb.onnx")
    proc = effc("compile", src, "-o", tmp_path / "out", "--target", "llvm")
    assert proc.returncode == 0, proc.stderr
    assert "Fast mode segfaults" not in proc.stderr and "Warning" not in proc.stderr
    assert "Fast mode segfaults" in (tmp_path / "out" / "build.log").read_text()
    assert "TVM's messages: " in proc.stderr
