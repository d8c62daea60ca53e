"""The int8 rule's AMX tiles (effc.codegen.int8_tile_call, effc/kernels/int8_tile.c) in compiled
models: linears, attention's Q.K^T and P.V, and conv GEMMs call the tile and agree with ONNX Runtime
(as tests/codegen/test_int8_qdq.py measures); a wrong tile fails the compile's check; a module built
with AMX tiles computes the same bytes where the process gets no tile state (EFFC_AMX=0: the tile's
VNNI path). EFFC_AMX=0 when building keeps the VNNI schedule (the other int8 tests, run so, cover it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")
from tests.codegen.qdq_conv_models import float_conv  # noqa: E402
from tests.codegen.qdq_models import calibration, float_attention, float_mlp, quantize_qdq  # noqa: E402
from tests.codegen.test_int8_qdq import compile_and_compare, step_of  # noqa: E402
from tests.devices import host_has  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [
    pytest.mark.skipif(not (host_has("amx-int8") and host_has("amx-tile")), reason="this CPU lacks AMX-INT8"),
    pytest.mark.skipif(os.environ.get("EFFC_AMX") == "0", reason="EFFC_AMX=0: the int8 rule builds VNNI tiles"),
]


def tile_calls(out) -> int | None:
    """Calls of the AMX tile in a compiled model.so (None without objdump)."""
    if not shutil.which("objdump"):
        return None
    asm = subprocess.run(["objdump", "-d", str(out / "model.so")], capture_output=True, text=True).stdout
    return sum(1 for line in asm.splitlines() if "call" in line and "<effc_int8_tile>" in line)


def mlp(tmp_path):
    shape = [2, 5, 37]  # rows 10 and n 50 pad their tiles; k 37 pads to quads and leaves a k tail
    path = quantize_qdq(float_mlp(2, (5,), 37, 50), tmp_path / "q.onnx", calibration(shape))
    return path, {"x": calibration(shape, 1, seed=9)[0]}


@pytest.mark.parametrize("model", ["mlp", "attention", "conv"])
def test_int8_products_call_the_amx_tile(tmp_path, model):
    if model == "mlp":
        path, feed = mlp(tmp_path)
        step = step_of(path, "m2_scale")
    elif model == "attention":  # 37 keys: a ragged Q.K^T panel and a P.V k tail; head_dim 8
        shape = [2, 37, 16]
        path = quantize_qdq(float_attention(2, 37, 2, 8), tmp_path / "a.onnx", calibration(shape))
        feed, step = {"x": calibration(shape, 1, seed=9)[0]}, step_of(path, "o_scale")
    else:  # s8 weight x u8 im2col (tdpbsud): 3x3 over an odd 13 x 11 map
        shape = [2, 8, 13, 11]
        path = quantize_qdq(float_conv(2, 8, 12, (13, 11), 3, 1, 1, 1), tmp_path / "c.onnx", calibration(shape),
                            op_types=("Conv", "Relu", "Add"))
        feed, step = {"x": calibration(shape, 1, seed=9)[0]}, step_of(path, "y_scale")
    res, _ = compile_and_compare(path, tmp_path / "out", feed, step)
    assert "int8-matmul" in res.rule_hits
    calls = tile_calls(tmp_path / "out")
    assert calls is None or calls >= res.rule_hits["int8-matmul"], calls


def test_a_few_rows_stay_on_vnni_tiles(tmp_path):
    """3 rows (a Gemm on x[3, 33]): the VNNI register tiles, no tile call."""
    from tests.codegen.test_int8_qdq import gemm_qdq

    path, feed = gemm_qdq(tmp_path)
    res, _ = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale"))
    assert res.rule_hits.get("int8-matmul") == 1
    assert tile_calls(tmp_path / "out") in (None, 0)


def test_a_wrong_int8_tile_fails_the_compile(tmp_path, monkeypatch, capsys):
    """Each tile computes one row too few (a legal, wrong kernel): compile exits 1 naming the rule."""
    import effc.codegen.int8_tile_call as tile_call
    from effc.cli import run

    real = tile_call.tile_edge
    monkeypatch.setattr(tile_call, "tile_edge", lambda c, axis, size, whole: real(c, axis, size, whole) - (axis == -2))
    path, _ = mlp(tmp_path)
    code = run(["compile", str(path), "-o", str(tmp_path / "out"), "--target", "llvm", "--passes", "none"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "disagrees with ONNX Runtime" in err and "int8-matmul" in err, err


def test_amx_module_runs_the_same_without_tile_state(tmp_path):
    """Integer products: the VNNI path of the same module gives the same bytes."""
    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled
    import onnx_ir as ir

    path, feed = mlp(tmp_path)
    compile_model(ir.from_proto(onnx.load(str(path))), "llvm", tmp_path / "out")
    here = load_compiled(tmp_path / "out")(feed)
    np.save(tmp_path / "x.npy", feed["x"])
    code = ("import json, sys, numpy as np; from effc.codegen.runtime import load_compiled; "
            "from effc.kernels import native; native.load('int8_tile'); "
            "amx = native._loaded['int8_tile'].effc_int8_tile_amx(); "
            f"out = load_compiled({str(tmp_path / 'out')!r})({{'x': np.load({str(tmp_path / 'x.npy')!r})}}); "
            f"np.save({str(tmp_path / 'y.npy')!r}, next(iter(out.values()))); print(json.dumps(amx))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "EFFC_AMX": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), next(iter(here.values())))


def test_the_tuner_leaves_amx_tiles_alone():
    """The tuner's int8 knobs are VNNI register tiles: on AMX nothing of the int8 rule is searched,
    and records do not count as applied."""
    from effc.codegen.schedules.cpu.int8_matmul import Int8Matmul
    from effc.codegen.target import llvm_target
    from effc.codegen.tune import tunable_rules

    target = llvm_target().tvm()
    assert "int8-matmul" not in [r.name for r in tunable_rules(target, "fp32")]
    assert Int8Matmul(records={"any": {"rule": "int8-matmul", "knobs": {"mr": 4}}}).recorded(None, target) == {}
