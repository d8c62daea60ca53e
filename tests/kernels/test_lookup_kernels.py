"""The effc.LookupLinear kernels equal the op's numpy reference: the CPU shuffle kernel (AVX-512BW,
k = 16, int8 tables), the plain kernel (any k, float tables), and the CUDA kernel's arithmetic (its TIR
with serial loops, on the CPU). Exactness: the same codes (ties to the first centroid, a 0 bit for a
zero difference), so the outputs differ by float32 summation order only."""

from __future__ import annotations

import numpy as np
import pytest

from effc.ops import lookup_linear as op

tvm = pytest.importorskip("tvm")
from effc.kernels import lookup_cpu as cpu  # noqa: E402  (needs TVM)
from effc.kernels import lookup_cuda as cuda  # noqa: E402
from tests.devices import requires_avx512  # noqa: E402

TOL = 2e-6  # of the output's largest magnitude: float32 rounding of C terms (C <= 40 here)


def random_layer(rng, encoder, chunks, v, k, n, dtype="int8", soft=False) -> cpu.Layer:
    if encoder == "pq":
        const = rng.standard_normal((chunks, k, v)).astype(np.float32)
    else:
        const, k = (0.3 * rng.standard_normal((chunks, v))).astype(np.float32), 2 ** v
    if dtype == "int8":
        tables = rng.integers(-128, 128, size=(chunks, k, n)).astype(np.int8)
        scale = rng.uniform(0.01, 0.1, chunks).astype(np.float32)
    else:
        tables, scale = rng.standard_normal((chunks, k, n)).astype(np.float32), np.ones(chunks, np.float32)
    return cpu.Layer(encoder, soft, const, tables, scale)


def reference(x, lay: cpu.Layer, bias):
    return op.reference(x.astype(np.float64), lay.encoder_const, lay.tables, lay.scale, bias, lay.encoder,
                        int(lay.soft))


def assert_matches(y, want):
    np.testing.assert_allclose(y, want, rtol=0, atol=TOL * np.abs(want).max())


@requires_avx512
@pytest.mark.parametrize("encoder, soft, m, chunks, v, n", [
    ("pq", False, 16, 6, 4, 64), ("pq", False, 32, 3, 16, 20), ("hash", False, 16, 8, 4, 70),
    ("hash", True, 48, 5, 4, 33)])  # ragged N (20, 70, 33): the last block's columns are padding
def test_shuffle_kernel_equals_reference(encoder, soft, m, chunks, v, n):
    rng = np.random.default_rng(m + n)
    lay = random_layer(rng, encoder, chunks, v, 16, n, soft=soft)
    bias = rng.standard_normal(n).astype(np.float32)
    kernel = cpu.LookupKernel(lay, bias, m)
    assert kernel.name == "lookup_shuffle"
    x = rng.standard_normal((m, chunks * v)).astype(np.float32)
    assert_matches(kernel(x), reference(x, lay, bias))


@pytest.mark.parametrize("encoder, soft, m, k, dtype", [("pq", False, 1, 16, "int8"), ("pq", False, 3, 5, "float32"),
                                                       ("hash", True, 2, None, "int8")])
def test_plain_kernel_equals_reference(encoder, soft, m, k, dtype):
    rng = np.random.default_rng(m)
    lay = random_layer(rng, encoder, 7, 3, k, 130, dtype, soft)  # N=130: past two 64-column blocks
    bias = rng.standard_normal(130).astype(np.float32)
    kernel = cpu.LookupKernel(lay, bias, m)
    assert kernel.name == "lookup_plain"
    x = rng.standard_normal((m, 21)).astype(np.float32)
    assert_matches(kernel(x), reference(x, lay, bias))


@pytest.mark.parametrize("m", [1, 16])  # both kernels (the shuffle one where the CPU has it)
def test_ties_take_the_first_code(m):
    """Two equal centroids at distance 0, and a zero sign difference: the first index, and bit 0."""
    rng = np.random.default_rng(5)
    lay = random_layer(rng, "pq", 2, 4, 16, 64)
    lay.encoder_const[0, 9] = lay.encoder_const[0, 3]
    x = rng.standard_normal((m, 8)).astype(np.float32)
    x[:, :4] = lay.encoder_const[0, 3]
    bias = np.zeros(64, np.float32)
    y = cpu.LookupKernel(lay, bias, m)(x)
    assert_matches(y, reference(x, lay, bias))
    picked = lay.scale[0] * lay.tables[0, 3].astype(np.float64)  # chunk 0 alone: subtract chunk 1's row
    rest = reference(x[:, 4:], cpu.Layer("pq", False, lay.encoder_const[1:], lay.tables[1:], lay.scale[1:]), bias)
    np.testing.assert_allclose(y - rest, np.broadcast_to(picked, y.shape), atol=1e-5)
    hashed = random_layer(rng, "hash", 2, 4, None, 64)
    x = np.repeat(hashed.encoder_const.reshape(1, 8), m, axis=0)  # every difference 0: code 0
    assert_matches(cpu.LookupKernel(hashed, bias, m)(x), reference(x, hashed, bias))


def test_pack_shuffle_layout():
    tables = np.random.default_rng(0).integers(-128, 128, size=(3, 16, 20)).astype(np.int8)
    packed = cpu.pack_shuffle(tables)
    assert packed.shape == (2, 3, cpu.BLOCK, 64)  # N=20 padded to two blocks of 16 columns
    t, c, b, lane, j = 1, 2, 0, 3, 11  # column 16t + 4b + lane = 19
    assert packed[t, c, b, 16 * lane + j] == tables[c, j, 19]
    assert not packed[1, :, 1:].any()  # the padding columns are zero


def test_shuffle_needs_its_layout_and_avx512bw():
    from effc.codegen.target import llvm_target

    rng = np.random.default_rng(0)
    haswell = tvm.target.Target(llvm_target(1, mcpu="haswell").spec)
    assert cpu.shuffle_misfit(random_layer(rng, "pq", 2, 4, 16, 8), haswell) == "no AVX-512BW"
    znver4 = tvm.target.Target(llvm_target(1, mcpu="znver4").spec)
    assert cpu.shuffle_misfit(random_layer(rng, "pq", 2, 4, 16, 8), znver4) is None
    assert "k=8" in cpu.shuffle_misfit(random_layer(rng, "pq", 2, 4, 8, 8), znver4)
    assert "float tables" in cpu.shuffle_misfit(random_layer(rng, "pq", 2, 4, 16, 8, "float32"), znver4)
    tiny = random_layer(rng, "pq", 2, 4, 16, 8)
    tiny.scale[1] = 1e-32
    assert "below 2^-100" in cpu.shuffle_misfit(tiny, znver4)


@pytest.mark.parametrize("encoder, soft, m, n, k, dtype", [("pq", False, 10, 130, 16, "int8"),
                                                          ("hash", True, 3, 50, None, "float32"),
                                                          ("pq", False, 1, 300, 4, "int8")])
def test_cuda_kernel_arithmetic_equals_reference(encoder, soft, m, n, k, dtype):
    rng = np.random.default_rng(n)
    lay = random_layer(rng, encoder, 11, 3, k, n, dtype, soft)  # 11 chunks: ROWS x C pairs not whole blocks
    bias = rng.standard_normal(n).astype(np.float32)
    kernel = cuda.choose(lay, m, gpu=False)
    lib = tvm.compile(tvm.IRModule({"f": kernel.func.with_attr("global_symbol", "f")}),
                      target=cpu.host_target()).jit()
    x = rng.standard_normal((m, 33)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["f"](*(tvm.runtime.tensor(a) for a in (x, *kernel.weights, bias)), y)
    assert_matches(y.numpy(), reference(x, lay, bias))


def test_cuda_refuses_tables_past_a_shared_stage():
    lay = random_layer(np.random.default_rng(0), "pq", 2, 2, 256, 8, "float32")
    assert "exceed" in cuda.misfit(lay)
    assert cuda.misfit(random_layer(np.random.default_rng(0), "pq", 2, 2, 16, 8)) is None


def test_fit_refuses_non_float32_io():
    import onnx_ir as ir

    def node(dtype):
        inputs = [ir.Value(name=n, type=ir.TensorType(d)) for n, d in
                  (("x", dtype), ("e", ir.DataType.FLOAT), ("t", ir.DataType.INT8), ("s", ir.DataType.FLOAT),
                   ("b", dtype))]
        return ir.Node("effc", op.NAME, inputs, attributes=[ir.AttrString("encoder", "pq")])

    assert cpu.fit(node(ir.DataType.FLOAT), [], None) is None
    assert "float32 X and bias" in cpu.fit(node(ir.DataType.FLOAT16), [], None)
    layer = random_layer(np.random.default_rng(0), "pq", 2, 4, 16, 8)
    assert "float32 X and bias" in cuda.fit(node(ir.DataType.FLOAT16), [layer.encoder_const, layer.tables, layer.scale],
                                            None)
