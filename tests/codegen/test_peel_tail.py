"""effc.codegen.peel_tail: a matmul whose rows are not a multiple of the row tile gets its last tile
peeled (the full tiles' k loop carries no row check) and computes the same, batched or not; a
matmul without a tail is left alone."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def scheduled(batch, m, k, n, mr=8):
    """x[batch, m, k] @ W[k, n] (W a computed operand: packed in the kernel) scheduled by the matmul rule."""
    from tvm import te

    from effc.codegen.schedules.cpu.matmul import Matmul

    x, w = te.placeholder((batch, m, k), "float32", name="x"), te.placeholder((k, n), "float32", name="w")
    r = te.reduce_axis((0, k), "r")
    y = te.compute((batch, m, n), lambda s, i, j: te.sum(x[s, i, r] * w[r, j], axis=r), name="matmul")
    func = te.create_prim_func([x, w, y])
    sch = Matmul().schedule(func, mr=mr, nr_vectors=2)
    return tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})


@pytest.mark.parametrize("batch,m", [(1, 197), (2, 13), (3, 9)])
def test_partial_row_tile_is_peeled_and_the_result_unchanged(batch, m):
    from effc.codegen.lower import build_config, tir_pipeline
    from effc.codegen.peel_tail import PEEL_KEY, peel_tail_pass
    from effc.codegen.target import llvm_target

    k, n = 48, 40  # n pads to the tile width too
    mod = scheduled(batch, m, k, n)
    assert PEEL_KEY in mod["main"].script()
    peeled = peel_tail_pass()(mod)["main"].script()
    assert PEEL_KEY not in peeled and peeled.count('"matmul_update"') == 2  # the loop's tiles, and the last
    target = llvm_target(2).tvm()
    with tvm.transform.PassContext(config=build_config(target)):
        lib = tvm.compile(mod, target=target, tir_pipeline=tir_pipeline(target)).jit()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((batch, m, n), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), x @ w, rtol=1e-4, atol=1e-4)


def test_rows_a_multiple_of_the_tile_are_not_marked():
    from effc.codegen.peel_tail import PEEL_KEY

    assert PEEL_KEY not in scheduled(1, 32, 48, 32)["main"].script()
