"""The CPU lookup-table kernel computes effc.ShiftAddMatMul exactly as the numpy reference does."""

from __future__ import annotations

import numpy as np
import pytest

from effc.ops import shift_add_matmul as op

tvm = pytest.importorskip("tvm")
from effc.kernels import shift_add_cpu as kernel  # noqa: E402  (needs TVM)
from tests.devices import requires_avx512  # noqa: E402  (needs TVM)


def packed(rng, q, n, k, group):
    planes = op.pack_planes(rng.choice([-1, 1], size=(q, n, k)))
    signs = rng.choice([-1, 0, 1], size=(q, n, k // group, 1), p=[0.45, 0.1, 0.45])  # 0: a zero scale
    codes = op.encode_terms(signs, rng.integers(-9, 3, size=signs.shape))
    return planes, codes, rng.standard_normal(n).astype(np.float32)


def unwords(a, n):
    """Kernel words [N/R, q, C, R] uint32 -> bytes [q, N, 4C] in K order."""
    blocks, q, c, rows = a.shape
    return np.ascontiguousarray(a.transpose(1, 0, 3, 2)).view(np.uint8).reshape(q, n, 4 * c)


def test_pack_folds_negative_scales_into_the_bytes():
    planes, codes, _ = packed(np.random.default_rng(0), 2, 64, 32, 16)  # 2 groups: padded to a word of 4
    p = kernel.pack(planes, codes)
    assert p.bits.dtype == p.exps.dtype == np.uint32 and p.shape == (2, 64, 32)
    bits, exps = unwords(p.bits, 64), unwords(p.exps, 64).astype(np.int64)
    assert bits.shape == (2, 64, 8) and exps.shape == (2, 64, 4)
    assert (exps[..., 2:] == 0).all()  # padding: zero scales
    bits, exps = bits[..., :4], exps[..., :2]
    scales = np.where(exps > 0, np.exp2(exps.astype(np.float64) - 127), 0.0)[..., None]  # float32 exponent fields
    assert (scales >= 0).all()  # signs now live in the bits
    rebuilt = (op.unpack_planes(bits).reshape(2, 64, -1, 16) * scales).sum(axis=0).reshape(64, -1)
    np.testing.assert_array_equal(rebuilt, op.dense_weight(planes, codes))


def test_pack_refuses_layouts_it_cannot_run():
    planes, codes, _ = packed(np.random.default_rng(1), 2, 64, 32, 8)
    with pytest.raises(ValueError, match="one term"):
        kernel.pack(planes, np.concatenate([codes, codes], axis=-1))
    with pytest.raises(ValueError, match="multiple"):
        kernel.pack(planes[:, :48], codes[:, :48])


@requires_avx512  # the kernel uses AVX-512 shuffles
@pytest.mark.parametrize("m, n, k, q, group", [(1, 64, 64, 3, 8), (3, 128, 96, 2, 8), (2, 64, 128, 4, 16),
                                                (1, 64, 40, 2, 8), (2, 64, 48, 3, 16)])  # K padded to whole words
def test_kernel_equals_reference(m, n, k, q, group):
    rng = np.random.default_rng(m * 7 + q)
    planes, codes, bias = packed(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = kernel.ShiftAddKernel(planes, codes, bias, m)(x)
    want = op.reference(x.astype(np.float64), planes, codes, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_prefill_pack_keeps_the_weight():
    from effc.kernels import shift_add_prefill as prefill

    planes, codes, _ = packed(np.random.default_rng(2), 3, 64, 64, 16)
    p = prefill.pack_prefill(planes, codes, k_block=32, outs=4)
    blocks, nb, _ = p.bits.shape
    bits = p.bits.reshape(blocks, nb * 4, 3, 4).transpose(2, 1, 0, 3).reshape(3, 64, 8)
    field = p.exps.reshape(blocks, nb * 4, 3, 4).transpose(2, 1, 0, 3).reshape(3, 64, 8).astype(np.int64)
    scales = np.where(field > 0, np.exp2(field - 127), 0.0)[..., None]  # one per byte
    rebuilt = (op.unpack_planes(bits).reshape(3, 64, 8, 8) * scales).sum(axis=0).reshape(64, 64)
    np.testing.assert_array_equal(rebuilt, op.dense_weight(planes, codes))


@requires_avx512
@pytest.mark.parametrize("m, n, k, q, group", [(16, 64, 64, 3, 8), (37, 128, 72, 2, 8), (64, 64, 256, 4, 16), (32, 64, 48, 3, 16)])
def test_prefill_kernel_equals_reference(m, n, k, q, group):
    """M >= 16 picks the prefill kernel (rows of X as lanes, X padded to whole row blocks)."""
    rng = np.random.default_rng(m + q)
    planes, codes, bias = packed(rng, q, n, k, group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    run = kernel.ShiftAddKernel(planes, codes, bias, m)
    assert run.name == "shift_add_prefill"
    want = op.reference(x.astype(np.float64), planes, codes, bias)
    np.testing.assert_allclose(run(x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
