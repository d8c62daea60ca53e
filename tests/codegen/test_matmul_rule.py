"""The CPU matmul rule on ragged shapes: n not a multiple of the vector tile (padded panels, trimmed
write-back), m not a multiple of the row tile, two computed operands (attention), a transposed
weight reached through a Transpose (folded at compile time, then pre-packed), and an epilogue that
reads other inputs. Each compiled kernel must agree with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes
from tests.codegen.checks import compile_and_compare

pytest.importorskip("tvm")


def test_ragged_lm_head_with_side_input_epilogue(tmp_path):
    """GPT-2's LM head after layernorm-to-rmsnorm: x @ Transpose(W) + rowscale * colmean, n = 100."""
    import tvm

    rng = np.random.default_rng(0)
    m, k, n = 37, 96, 100
    inits = [numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "colmean")]
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["mm"]),
             helper.make_node("ReduceMean", ["x"], ["rowscale"], axes=[-1], keepdims=1),
             helper.make_node("Mul", ["rowscale", "colmean"], ["side"]),
             helper.make_node("Add", ["mm", "side"], ["y"])]
    result = compile_and_compare(model_from_nodes(nodes, [("x", [1, m, k])], [("y", [1, m, n])], inits), tmp_path)
    matmul_kernels = [name for name, rule in result.kernels.items() if "matmul" in name]
    assert matmul_kernels and all(result.kernels[name] == "matmul" for name in matmul_kernels), result.kernels
    shapes = [tuple(p.shape) for p in tvm.runtime.load_param_dict_from_file(str(tmp_path / "params.bin")).values()]
    packed = [s for s in shapes if len(s) == 3 and s[1] == k]
    assert packed and packed[0][0] * packed[0][2] >= n and (packed[0][0] * packed[0][2]) % 16 == 0, shapes
    assert (n, k) not in shapes and (k, n) not in shapes, "the unpacked weight should not be shipped"


@pytest.mark.parametrize("m,k,n", [(37, 16, 37), (37, 37, 16)])
def test_attention_batched_matmul_two_computed_operands(tmp_path, m, k, n):
    """QK^T (n = tokens, ragged) and AV (k = tokens) over 3 heads: both operands are inputs."""
    model = model_from_nodes([helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", [1, 3, m, k]), ("b", [1, 3, k, n])],
                   [("y", [1, 3, m, n])])
    result = compile_and_compare(model, tmp_path)
    assert result.rule_hits.get("matmul") == 1, result.kernels


def test_patch_embedding_conv_becomes_a_matmul(tmp_path):
    """A ViT patch Conv (stride == kernel, no padding) with bias, 14 filters, 3x3 patches of 8x8."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((14, 3, 8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(14).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], strides=[8, 8], kernel_shape=[8, 8])]
    result = compile_and_compare(model_from_nodes(nodes, [("x", [1, 3, 24, 24])], [("y", [1, 14, 3, 3])], inits), tmp_path)
    assert result.rule_hits.get("matmul") == 1 and not any("conv" in k for k in result.kernels), result.kernels


def test_padded_conv_is_not_patchified(tmp_path):
    """Overlapping or padded convs are not patch embeddings: left as convs, still correct."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], strides=[1, 1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    result = compile_and_compare(model_from_nodes(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits), tmp_path)
    assert any("conv" in k for k in result.kernels), result.kernels


@pytest.mark.parametrize(("n", "nr_vectors", "expected"), [
    (3072, 4, 64),    # divides: the requested width
    (50257, 4, 64),   # gpt2's head: 47 padded columns of 50257 beat a 32-wide tile that pads 15
    (197, 4, 16),     # 197 tokens: every wide tile pads too much, so the one that pads least
    (768, 2, 32),
])
def test_tile_width_prefers_the_requested_width_when_padding_is_cheap(n, nr_vectors, expected):
    from effc.codegen.schedules.cpu.panels import pick_nr

    assert pick_nr(n, 16, nr_vectors) == expected


def test_narrowed_tile_keeps_its_accumulators():
    from effc.codegen.schedules.cpu.matmul import MAX_MR, _pick_mr

    assert _pick_mr(4, 197, 4, 16, 16) == 16   # 4 x 4 vectors asked, 1 vector wide: 16 rows
    assert _pick_mr(4, 197, 4, 64, 16) == 4    # width as asked: the knob as is
    assert _pick_mr(8, 5, 4, 16, 16) == 5      # never more rows than m
    assert _pick_mr(12, 197, 2, 16, 16) == MAX_MR


@pytest.mark.parametrize("transposed", [False, True])
def test_single_row_head_is_a_gemv_with_a_packed_weight(tmp_path, transposed):
    """A decode step's LM head / a CLS classifier: one row of x, n ragged (100), W as [k, n] or as a
    Gemm's transB [n, k]; taken by the gemv rule (not the fallback), weight shipped packed."""
    import tvm

    rng = np.random.default_rng(1)
    k, n = 96, 100
    w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=int(transposed))]
    result = compile_and_compare(model_from_nodes(nodes, [("x", [1, k])], [("y", [1, n])], inits), tmp_path)
    assert "gemv" in result.kernels.values() and "fallback" not in result.kernels.values(), result.kernels
    shapes = [tuple(p.shape) for p in tvm.runtime.load_param_dict_from_file(str(tmp_path / "params.bin")).values()]
    assert (n, k) not in shapes and (k, n) not in shapes, "the unpacked weight should not be shipped"


def test_three_vector_tile_is_three_vectors_not_one_wide_one():
    """nr_vectors=3 (48 columns): LLVM's <48 x float> is no legal type and spilled the accumulators
    at every k step (3 GFLOP/s); the rule splits the tile into 3 unrolled 16-lane vectors."""
    import tvm
    from tvm import te, topi

    from effc.codegen.schedules.cpu.matmul import Matmul
    from effc.codegen.target import llvm_target

    m, k, n = 16, 64, 96
    a, b = te.placeholder((m, k), "float32", name="A"), te.placeholder((k, n), "float32", name="B")
    func = te.create_prim_func([a, b, topi.nn.matmul(a, b)])
    sch = Matmul().schedule(func, mr=8, nr_vectors=3)
    lib = tvm.compile(sch.mod, target=llvm_target(1).tvm())
    assert "<48 x float>" not in lib.mod.inspect_source("ll")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), x @ w, rtol=1e-5, atol=1e-4)
