"""`effc run` with 0-d inputs (Clip's min and max): given once (shared by every sample), or one
per sample on a new first axis; the compiled module is checked against ONNX Runtime."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from effc.errors import EffcError
from effc.verify import OrtRunner
from tests.helpers import effc

pytest.importorskip("tvm")

TOL = 1e-6  # Clip is exact


def _clip_proto(batch: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Clip", ["x", "min", "max"], ["y"], name="clip")], "clip",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 5]),
                               helper.make_tensor_value_info("min", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("max", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 5])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


@pytest.fixture(scope="module")
def clip_out(tmp_path_factory):
    """(model path, OUT) for Clip compiled at batch 1 with the CLI."""
    root = tmp_path_factory.mktemp("clip")
    onnx.save(_clip_proto(1), root / "clip.onnx")
    proc = effc("compile", root / "clip.onnx", "-o", root / "out", "--target", "llvm", "--passes", "none")
    assert proc.returncode == 0, proc.stderr
    return root / "clip.onnx", root / "out"


def _reference(model_path, feeds):
    return OrtRunner(str(model_path)).run_all(feeds)


def test_cli_run_with_0d_inputs_matches_ort(clip_out, tmp_path):
    model_path, out = clip_out
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)  # 4 samples on the batch-1 axis
    np.savez(tmp_path / "x.npz", x=x, min=np.float32(-0.4), max=np.float32(0.6))
    proc = effc("run", out, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert proc.returncode == 0, proc.stderr
    assert "(4 samples)" in proc.stdout
    y = np.load(tmp_path / "y.npz")["y"]
    feeds = [{"x": x[i:i + 1], "min": np.array(-0.4, np.float32), "max": np.array(0.6, np.float32)} for i in range(4)]
    ref = np.concatenate([r["y"] for r in _reference(model_path, feeds)])
    assert y.shape == (4, 3, 5) and np.max(np.abs(y - ref)) <= TOL
    assert y.min() >= -0.4 and y.max() <= 0.6 and np.any(y == 0.6)  # the bounds were applied


def test_feeds_for_0d_inputs_shared_stacked_and_refused(clip_out, tmp_path):
    from effc.cli_codegen import _feeds_for, _merge
    from effc.codegen.runtime import load_compiled

    model_path, out = clip_out
    compiled = load_compiled(out)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, 5)).astype(np.float32)
    lows, highs = np.array([-0.1, -0.5, -1.0], np.float32), np.array([0.2, 0.5, 1.5], np.float32)

    np.savez(tmp_path / "one.npz", x=x[:1], min=np.float32(-0.2), max=np.float32(0.3))  # one sample, as compiled
    feeds = _feeds_for(compiled, str(tmp_path / "one.npz"))
    assert len(feeds) == 1 and feeds[0]["min"].shape == ()

    np.savez(tmp_path / "per.npz", x=x, min=lows, max=highs)  # one bound per sample, stacked
    feeds = _feeds_for(compiled, str(tmp_path / "per.npz"))
    assert [float(f["min"]) for f in feeds] == lows.tolist() and feeds[2]["max"].shape == ()
    got = _merge([compiled(f) for f in feeds], compiled.output_names)["y"]
    ref = np.concatenate([r["y"] for r in _reference(model_path, feeds)])
    assert got.shape == (3, 3, 5) and np.max(np.abs(got - ref)) <= TOL

    np.savez(tmp_path / "one_per.npz", x=x[:1], min=lows[:1], max=highs[:1])  # [1] for a 0-d input: 1 sample
    assert len(_feeds_for(compiled, str(tmp_path / "one_per.npz"))) == 1

    np.savez(tmp_path / "bad.npz", x=x, min=lows[:2], max=highs)
    with pytest.raises(EffcError, match="disagree on the number of samples"):
        _feeds_for(compiled, str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "wrong.npz", x=x, min=np.zeros((3, 2), np.float32), max=highs)
    with pytest.raises(EffcError, match=r"input 'min' has shape \[3, 2\], compiled for \[\]"):
        _feeds_for(compiled, str(tmp_path / "wrong.npz"))


def test_merge_stacks_0d_outputs():
    from effc.cli_codegen import _merge

    results = [{"s": np.float32(i), "y": np.full((1, 2), i, np.float32)} for i in range(3)]
    merged = _merge(results, ["s", "y"])
    assert merged["s"].shape == (3,) and merged["y"].shape == (3, 2)
