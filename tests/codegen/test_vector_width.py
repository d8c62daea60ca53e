"""The CPU rules size vectors and register tiles from the target's features, not from AVX-512:
a build for `-mcpu=haswell` (AVX2) uses 8-lane vectors and no zmm register, and still agrees with
ONNX Runtime; a build for the host uses the host's width."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from onnx import helper, numpy_helper

from effc.verify import OrtRunner, deviation, make_inputs
from tests.codegen.blocks import model_from_nodes

pytest.importorskip("tvm")

TOL = 1e-4
ROW = 13  # softmax / layernorm row: a whole AVX2 vector (8) and a tail, less than one AVX-512 vector


def _target(mcpu=None, mattr=None):
    import tvm

    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu or "generic"}
    return tvm.target.Target({**spec, **({"mattr": mattr} if mattr else {})})


@pytest.mark.parametrize(("mcpu", "mattr", "expected"), [
    ("haswell", None, 32), ("skylake-avx512", None, 64), ("x86-64", None, 16),
    ("haswell", ["+avx512f"], 64),  # -mattr counts as much as -mcpu
])
def test_vector_bytes_follow_mcpu_and_mattr(mcpu, mattr, expected):
    from effc.codegen.target import vector_bytes, vector_registers

    assert vector_bytes(_target(mcpu, mattr)) == expected
    assert vector_registers(_target(mcpu, mattr)) == (32 if expected == 64 else 16)


def _tile_loops(sch) -> tuple[set, set]:
    """(extents of the vectorised loops, extents of the unrolled loops) of a scheduled kernel."""
    script = sch.mod["main"].script()
    extents = lambda kind: {int(e) for e in re.findall(rf"T\.{kind}\((\d+)\)", script)}  # noqa: E731
    return extents("vectorized"), extents("unroll")


@pytest.mark.parametrize(("mcpu", "columns", "rows"), [("haswell", 16, 6), ("skylake-avx512", 32, 8)])
def test_matmul_tile_follows_the_vector_width(mcpu, columns, rows):
    """Default knobs: 2 vectors of columns (16 floats on AVX2, 32 on AVX-512) by 6 rows on AVX2's
    16 registers, 8 rows on AVX-512's 32."""
    from tvm import te, topi

    from effc.codegen.schedules.cpu.matmul import Matmul

    a, b = te.placeholder((30, 40), "float32", name="A"), te.placeholder((40, 96), "float32", name="B")
    func = te.create_prim_func([a, b, topi.nn.matmul(a, b)])
    sch = Matmul().apply(func, _target(mcpu), False)
    vectorised, unrolled = _tile_loops(sch)
    assert vectorised == {columns} and rows in unrolled, (vectorised, unrolled)


def _model(batch=2, seq=5, dim=37):
    """x[2, 5, 37] -> Linear(37 -> 13) -> Softmax -> LayerNorm(13)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((dim, ROW)).astype(np.float32) * 0.3, "W"),
             numpy_helper.from_array(rng.standard_normal(ROW).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(ROW).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(ROW).astype(np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Softmax", ["h"], ["p"], axis=-1),
             helper.make_node("LayerNormalization", ["p", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    return model_from_nodes(nodes, [("x", [batch, seq, dim])], [("y", [batch, seq, ROW])], inits)


def _has_zmm(library) -> bool:
    tool = shutil.which("objdump") or shutil.which("llvm-objdump")
    if tool is None:
        pytest.skip("no objdump to read the built code")
    text = subprocess.run([tool, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout
    return "%zmm" in text


def test_avx2_build_has_no_zmm_and_agrees_with_ort(tmp_path):
    from effc.codegen.build import compile_model, run_compiled
    from effc.codegen.target import llvm_target, vector_bytes

    host = llvm_target(2)
    if not _runs_avx2():
        pytest.skip("the host cannot run AVX2 code")
    model = _model()
    feeds = make_inputs(model, 2, seed=4)
    expected = OrtRunner(model).run_all(feeds)
    kernels = {}
    for name, bt in (("haswell", llvm_target(2, mcpu="haswell")), ("host", host)):
        out = tmp_path / name
        kernels[name] = compile_model(model, bt, out, records=None).kernels
        dev = deviation(run_compiled(out, feeds), expected)
        assert dev.max_rel < TOL, (name, dev)
        if name == "haswell":
            assert not _has_zmm(out / "model.so"), "AVX2 build contains AVX-512 code"
        elif vector_bytes(bt.tvm()) == 64:
            assert _has_zmm(out / "model.so"), "the AVX-512 host build uses no zmm register"
    # A 13-wide softmax row holds one AVX2 vector (the softmax kernel takes it) but no AVX-512 one.
    assert "softmax" in kernels["haswell"].values(), kernels["haswell"]
    if vector_bytes(host.tvm()) == 64:
        assert "softmax" not in kernels["host"].values(), kernels["host"]


def _runs_avx2() -> bool:
    try:
        return " avx2 " in f" {open('/proc/cpuinfo').read().replace(chr(10), ' ')} "
    except OSError:
        return False
