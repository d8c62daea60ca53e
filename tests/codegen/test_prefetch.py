"""effc.codegen.prefetch: the matmul k loop over a large packed weight gets prefetch bursts of the
next panel (and computes the same); a small weight or a computed B gets none."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def scheduled(m, k, n, weight_is_param=True):
    from tvm import te, topi

    from effc.codegen.schedules.cpu.matmul import Matmul
    from effc.codegen.tune import _without_prepack

    a, b = te.placeholder((m, k), "float32", name="A"), te.placeholder((k, n), "float32", name="B")
    func = te.create_prim_func([a, b, topi.nn.matmul(a, b)])
    if weight_is_param:
        func = func.with_attr("layout_free_buffers", [1])  # a weight: packed at compile time
    sch = Matmul().schedule(func, mr=8, nr_vectors=2)
    compute = _without_prepack(sch.mod["main"]) if weight_is_param else sch.mod["main"]
    return tvm.IRModule({"main": compute.with_attr("global_symbol", "main")})


def prefetched(mod):
    from effc.codegen.prefetch import prefetch_pass

    return prefetch_pass()(mod)


def test_large_weight_panel_is_prefetched_and_the_result_unchanged():
    from effc.codegen.lower import tir_pipeline
    from effc.codegen.target import llvm_target

    m, k, n = 32, 256, 1024  # weight 1 MiB
    mod = scheduled(m, k, n)
    script = prefetched(mod)["main"].script()
    assert script.count("llvm.prefetch") == 1 and "ko" in script  # one burst per 64-step chunk of k
    target = llvm_target(2).tvm()
    lib = tvm.compile(mod, target=target, tir_pipeline=tir_pipeline(target)).jit()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    panel_shape = [int(d) for d in mod["main"].params[1].shape]  # [n / 32, k, 32]
    panel = rng.standard_normal(panel_shape).astype(np.float32)
    weight = panel.transpose(1, 0, 2).reshape(k, n)  # the [k, n] weight the panels block
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(panel), y)
    np.testing.assert_allclose(y.numpy(), x @ weight, rtol=1e-4, atol=1e-3)


def test_small_weight_and_computed_operand_get_no_prefetch():
    assert "llvm.prefetch" not in prefetched(scheduled(32, 256, 256))["main"].script()  # 256 KiB: in cache
    assert "llvm.prefetch" not in prefetched(scheduled(32, 256, 1024, weight_is_param=False))["main"].script()
