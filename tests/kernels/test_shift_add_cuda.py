"""The CUDA lookup-table kernel's arithmetic, checked on the CPU: the same TIR body with serial loops
in place of thread bindings equals effc.ShiftAddMatMul's numpy reference, and so does the GPU kernel where a
GPU is present; its layout keeps the weight."""

from __future__ import annotations

import numpy as np
import pytest

from effc.ops import shift_add_matmul as op

tvm = pytest.importorskip("tvm")
from effc.kernels import shift_add_cuda as kernel  # noqa: E402  (needs TVM)
from effc.kernels.shift_add_cpu import host_target  # noqa: E402


def packed(rng, q, n, k, group):
    planes = op.pack_planes(rng.choice([-1, 1], size=(q, n, k)))
    signs = rng.choice([-1, 0, 1], size=(q, n, k // group, 1), p=[0.45, 0.1, 0.45])  # 0: a zero scale
    codes = op.encode_terms(signs, rng.integers(-9, 3, size=signs.shape))
    return planes, codes, rng.standard_normal(n).astype(np.float32)


def test_pack_keeps_the_weight():
    planes, codes, _ = packed(np.random.default_rng(0), 2, 48, 64, 16)
    p = kernel.pack(planes, codes)
    assert p.shape == (2, 48, 64) and p.bits.shape == (2, kernel.CHUNK, 48)  # K padded to a whole chunk
    bits, field = p.bits.transpose(0, 2, 1)[..., :8], p.exps.transpose(0, 2, 1)[..., :4].astype(np.int64)
    assert not p.exps[:, 4:].any()  # padding: zero scales
    scales = np.where(field > 0, np.exp2(field.astype(np.float64) - 127), 0.0)[..., None]
    rebuilt = (op.unpack_planes(bits).reshape(2, 48, 4, 16) * scales).sum(axis=0).reshape(48, 64)
    np.testing.assert_array_equal(rebuilt, op.dense_weight(planes, codes))


@pytest.mark.parametrize("m, n, k, q, group", [(1, 128, 64, 3, 8), (3, 200, 72, 2, 8), (2, 64, 512, 4, 16),
                                                (1, 130, 264, 3, 8)])  # ragged N, K past one chunk
def test_kernel_arithmetic_equals_reference(m, n, k, q, group):
    rng = np.random.default_rng(m + n + k)
    planes, codes, bias = packed(rng, q, n, k, group)
    p = kernel.pack(planes, codes)
    func = kernel.prim_func(m, n, k, q, group, gpu=False).with_attr("global_symbol", "f")
    lib = tvm.compile(tvm.IRModule({"f": func}), target=host_target()).jit()
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["f"](*(tvm.runtime.tensor(a) for a in (x, p.bits, p.exps, bias)), y)
    want = op.reference(x.astype(np.float64), planes, codes, bias)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_misfit_names_the_reason():
    assert kernel.misfit((3, 64, 8), (3, 64, 8, 1)) is None
    assert "2 power-of-two terms" in kernel.misfit((3, 64, 8), (3, 64, 8, 2))
    assert "whole number of bytes" in kernel.misfit((3, 64, 8), (3, 64, 16, 1))  # groups of 4 columns


@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no GPU: the arithmetic is checked above with serial loops")
@pytest.mark.parametrize("m, n, k, q", [(1, 4096, 4096, 3), (128, 768, 3072, 2), (5, 130, 264, 4)])
def test_kernel_on_gpu_equals_reference(m, n, k, q):
    from effc.codegen.target import cuda_target

    rng = np.random.default_rng(n + k)
    planes, codes, bias = packed(rng, q, n, k, 8)
    choice = kernel.choose(planes, codes, m)
    func = choice.func.with_attr("global_symbol", choice.symbol)
    arch = "sm_{}{}".format(*tvm.cuda(0).compute_version.split("."))
    lib = tvm.compile(tvm.IRModule({choice.symbol: func}), target=cuda_target(arch).tvm()).jit()
    dev = tvm.cuda(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32), dev)  # poisoned: every element must be written
    lib[choice.symbol](*(tvm.runtime.tensor(a, dev) for a in (x, *choice.weights, bias)), y)
    want = op.reference(x.astype(np.float64), planes, codes, bias)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
