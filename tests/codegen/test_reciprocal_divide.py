"""QuantizeLinear's round(x / scale) multiplies by the reciprocal (no vdivps per 16 values); a
division the model wrote outside a round stays a division."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")


def test_round_of_a_constant_division_multiplies():
    from tvm import tirx

    from effc.codegen.reciprocal_divide import _rewrite

    x = tirx.Var("x", "float32")
    out = _rewrite(tirx.round(x / tirx.FloatImm("float32", 0.02)))
    assert out.op.name == "tirx.round" and isinstance(out.args[0], tirx.Mul)
    assert abs(float(out.args[0].b.value) - 50.0) < 1e-4


def test_other_divisions_stay():
    from tvm import tirx

    from effc.codegen.reciprocal_divide import _rewrite

    x, y = tirx.Var("x", "float32"), tirx.Var("y", "float32")
    plain = x / tirx.FloatImm("float32", 3.0)
    assert _rewrite(plain).same_as(plain)  # not under a round: the model's own arithmetic, exact
    by_variable = tirx.round(x / y)
    assert _rewrite(by_variable).same_as(by_variable)


def test_a_qdq_module_has_no_vector_division(tmp_path):
    """The int8 write-backs of a QDQ linear quantize without vdivps."""
    import shutil
    import subprocess

    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    import onnx

    from effc.codegen.build import compile_model
    from effc.frontend.onnx import load
    from tests.codegen.qdq_models import calibration, float_mlp, quantize_qdq

    path = quantize_qdq(float_mlp(1, (7,), 32, 48, gelu=False), tmp_path / "q.onnx", calibration([1, 7, 32]),
                        op_types=("MatMul", "Add", "Relu"))
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)
    compile_model(load(path), "llvm", tmp_path / "out")
    asm = subprocess.run(["objdump", "-d", str(tmp_path / "out" / "model.so")], capture_output=True, text=True).stdout
    assert "vdivps" not in asm
