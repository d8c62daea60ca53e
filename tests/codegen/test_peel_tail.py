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


def test_padded_columns_run_full_panels_in_a_branch_without_checks():
    """n = 40 pads to 3 panels of 16: the fused (batch, panel) loop is marked with the panel count
    and full_panel_pass gives the full panels (f % 3 < 2) a branch of their own; same result."""
    from effc.codegen.peel_tail import FULL_PANELS_KEY, full_panel_pass

    mod = scheduled(2, 13, 48, 40)
    assert f'"{FULL_PANELS_KEY}": 3' in mod["main"].script()
    split = full_panel_pass()(mod)["main"].script()
    assert FULL_PANELS_KEY not in split and "% 3 < 2:" in split, split
    assert FULL_PANELS_KEY not in scheduled(2, 13, 48, 32)["main"].script()  # no padded panel, no mark


@pytest.mark.parametrize("batch,m,k,n", [(2, 13, 37, 37), (1, 197, 64, 197), (3, 9, 8, 50)])
def test_int8_padded_panels_equal_numpy(batch, m, k, n):
    """The int8 rule's padded n (attention's 197 keys, odd sizes, batch > 1) through the whole CPU
    pipeline (full-panel branch, vpdpbusd): exact against numpy's integer product."""
    from tvm import te

    from effc.codegen.lower import build_config, tir_pipeline
    from effc.codegen.peel_tail import FULL_PANELS_KEY
    from effc.codegen.schedules.cpu.int8_matmul import Int8Matmul, has_vnni
    from effc.codegen.target import llvm_target

    target = llvm_target(2).tvm()
    if not has_vnni(target):
        pytest.skip("host CPU has no AVX-512 VNNI")
    a, b = te.placeholder((batch, m, k), "uint8", name="a"), te.placeholder((batch, k, n), "int8", name="b")
    r = te.reduce_axis((0, k), "r")
    acc = te.compute((batch, m, n), lambda s, i, j: te.sum(a[s, i, r].astype("int32") * b[s, r, j].astype("int32"),
                                                           axis=r), name="matmul")
    y = te.compute((batch, m, n), lambda s, i, j: acc[s, i, j].astype("float32") * 0.5, name="scale")
    sch = Int8Matmul().schedule(te.create_prim_func([a, b, y]), mr=6, nr_vectors=1)
    mod = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    assert FULL_PANELS_KEY in mod["main"].script()
    with tvm.transform.PassContext(config=build_config(target)):
        lib = tvm.compile(mod, target=target, tir_pipeline=tir_pipeline(target)).jit()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (batch, m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (batch, k, n)).astype(np.int8)
    out = tvm.runtime.tensor(np.full((batch, m, n), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_array_equal(out.numpy(), (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32) * 0.5)
