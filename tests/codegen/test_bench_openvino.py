"""`effc bench --vs ort,openvino`: OpenVINO at f32 and at its default precision, each stating the
precision it ran, timed in the same interleaved rounds and checked against ONNX Runtime; without
OpenVINO, one line and exit 2."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from onnx import helper, numpy_helper

from effc.ir import save
from tests.codegen.blocks import model_from_nodes

pytest.importorskip("tvm")


def _mlp(batch=2, seq=5, dim=37, hidden=51):
    """x[2, 5, 37] -> MatMul -> Add -> Relu -> MatMul -> y[2, 5, 37]."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array((rng.standard_normal((dim, hidden)) / np.sqrt(dim)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return model_from_nodes(nodes, [("x", [batch, seq, dim])], [("y", [batch, seq, dim])], inits)


@pytest.fixture
def compiled_out(tmp_path):
    from effc.codegen.build import compile_model

    model = _mlp()
    save(model, tmp_path / "model.onnx")  # as `effc compile` writes it
    compile_model(model, "llvm", tmp_path, records=None)
    return tmp_path


def test_bench_against_openvino_at_both_precisions(compiled_out):
    pytest.importorskip("openvino")
    from effc.codegen.bench import BURST, bench

    result = bench(compiled_out, ("ort", "openvino"), warmup=1, runs=2, settle_s=0.001)
    for engine in ("effc", "ort", "openvino-f32", "openvino"):
        assert result[engine]["runs"] == 2 * BURST and result[engine]["median_ms"] > 0, (engine, result)
    assert result["openvino-f32"]["precision"] == "f32"
    assert result["openvino"]["precision"] in ("f32", "bf16", "f16"), result["openvino"]
    assert result["ratio_vs_openvino-f32"] > 0 and result["ratio_vs_openvino"] > 0
    assert result["openvino-f32_max_rel_err"] < 1e-4, result
    # the default may round matmul inputs to bf16 (8 mantissa bits): close, and no closer than f32
    assert result["openvino_max_rel_err"] < 3e-2, result
    if result["openvino"]["precision"] != "f32":
        assert result["openvino_max_rel_err"] > result["openvino-f32_max_rel_err"], result


def test_openvino_threads_are_not_pinned(compiled_out):
    """Pinned, OpenVINO's threads slowed the engine timed after it (effc/codegen/openvino_engine.py)."""
    pytest.importorskip("openvino")
    from effc.codegen.openvino_engine import OpenVinoEngine

    engine = OpenVinoEngine(compiled_out / "model.onnx", {"x": np.zeros((2, 5, 37), np.float32)}, 2, "f32")
    assert engine.compiled.get_property("ENABLE_CPU_PINNING") is False


def test_missing_openvino_is_one_line_and_exit_2(compiled_out, monkeypatch, capsys):
    from effc.cli import run

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    assert run(["bench", str(compiled_out), "--vs", "ort,openvino", "--runs", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "OpenVINO" in err and "effc[bench]" in err, err
