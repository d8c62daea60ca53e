"""effc.codegen.requant_casts: a value quantized and dequantized in one kernel stays float, with the
same bits as the round trip through bytes; what is not a whole number inside the byte's range keeps
its casts."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def qdq_func(dtype="uint8", zero=7, low=0.0, high=255.0, rounded=True):
    """y = dequantize(quantize(x * 3)) as TVM legalises it (scale 0.05), one kernel."""
    from tvm.script import tirx as T

    def q(v):
        inner = T.round(v * T.float32(3.0) / T.float32(0.05)) if rounded else v * T.float32(3.0) / T.float32(0.05)
        return T.Cast(dtype, T.max(T.min(inner + T.float32(zero), T.float32(high)), T.float32(low)))

    @T.prim_func(s_tir=True)
    def main(x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in range(64):
            with T.sblock("qdq"):
                vi = T.axis.spatial(64, i)
                y[vi] = T.Cast("float32", T.Cast("int32", q(x[vi])) - zero) * T.float32(0.05)

    return main


def run(func, x):
    target = tvm.target.Target("llvm")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target).jit()
    y = tvm.runtime.tensor(np.zeros(64, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    return y.numpy()


@pytest.mark.parametrize("dtype, zero, low, high", [("uint8", 7, 0.0, 255.0), ("int8", -3, -128.0, 127.0)])
def test_round_trip_becomes_a_subtraction_with_the_same_bits(dtype, zero, low, high):
    from effc.codegen.requant_casts import requant_casts_pass

    func = qdq_func(dtype, zero, low, high)
    rewritten = requant_casts_pass()(tvm.IRModule({"main": func}))["main"]
    text = rewritten.script()
    assert f'T.Cast("{dtype}"' not in text and 'T.Cast("int32"' not in text, text
    rng = np.random.default_rng(0)
    # clipped at both ends, exact halves (ties), and ordinary values
    x = np.concatenate([rng.standard_normal(40) * 5, np.arange(-12, 12) * (0.05 / 3) * 0.5]).astype(np.float32)
    np.testing.assert_array_equal(run(rewritten, x), run(func, x))


@pytest.mark.parametrize("kwargs", [{"rounded": False}, {"high": 300.0}, {"dtype": "int8", "low": -200.0, "high": 100.0}])
def test_values_not_whole_or_out_of_range_keep_their_casts(kwargs):
    from effc.codegen.requant_casts import requant_casts_pass

    func = qdq_func(**kwargs)
    assert requant_casts_pass()(tvm.IRModule({"main": func}))["main"].script() == func.script()
