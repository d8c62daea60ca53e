"""The CPU row rules: softmax (its own hand-written kernel), LayerNormalization, RMSNormalization
and a decomposed layer norm (the row-reduction rule), on row lengths that split into vector lanes
(128) and that do not (197, and 21 with a 5-wide tail), agree with ONNX Runtime and are taken by
their rule rather than the fallback."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes
from tests.codegen.checks import compile_and_compare

pytest.importorskip("tvm")


@pytest.mark.parametrize("cols", [128, 197, 21])
def test_softmax(tmp_path, cols):
    model = model_from_nodes([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", [1, 3, 21, cols])],
                   [("y", [1, 3, 21, cols])])
    result = compile_and_compare(model, tmp_path)
    assert set(result.kernels.values()) == {"softmax"}, result.kernels


def test_softmax_rows_shorter_than_a_vector_go_to_the_row_reduction(tmp_path):
    model = model_from_nodes([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", [1, 5, 7])], [("y", [1, 5, 7])])
    result = compile_and_compare(model, tmp_path)
    assert set(result.kernels.values()) == {"reduction"}, result.kernels


def test_softmax_kernel_handles_extreme_logits():
    """Rows with a huge spread (exp underflows for most entries) and an all-equal row stay finite
    and normalised, like numpy's softmax."""
    import tvm

    from effc.codegen.schedules.cpu.softmax import softmax_kernel
    from effc.codegen.target import llvm_target

    x = np.zeros((3, 37), np.float32)
    x[0] = np.linspace(-500, 80, 37)
    x[1, 5] = 3e4
    y = tvm.runtime.tensor(np.zeros_like(x))
    func = softmax_kernel([3, 37], 3, 37).with_attr("global_symbol", "main")
    tvm.compile(tvm.IRModule({"main": func}), target=llvm_target().tvm()).jit()["main"](tvm.runtime.tensor(x), y)
    ref = np.exp(x - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)
    # far below the row max: exactly 0, not a denormal (denormals cost x86 a microcode assist each)
    far = (x - x.max(-1, keepdims=True)) < -87
    assert far.any() and (y.numpy()[far] == 0).all()


@pytest.mark.parametrize("shape", [(2, 3, 197), (5, 16), (4, 37)])
def test_softmax_kernel_writes_bf16_rounded_to_nearest(shape):
    """The bf16-output variant (attention's softmax under --precision bf16, its cast fused): each
    probability is the fp32 softmax rounded to bf16 (within half a bf16 unit: 2^-8 relative, where
    truncation would miss by up to 2^-7), rows of any length, the ragged tail included."""
    import tvm

    from effc.codegen.schedules.cpu.softmax import softmax_kernel
    from effc.codegen.target import llvm_target

    x = (np.random.default_rng(5).standard_normal(shape) * 4).astype(np.float32)
    x[..., -1] = -3.4e38  # a masked position, in the tail when there is one
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    y = tvm.runtime.empty(shape, "bfloat16")
    func = softmax_kernel(list(shape), rows, n, out_dtype="bfloat16").with_attr("global_symbol", "main")
    tvm.compile(tvm.IRModule({"main": func}), target=llvm_target().tvm()).jit()["main"](tvm.runtime.tensor(x), y)
    got = y.numpy().astype(np.float32)
    ref = np.exp(x - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert (np.abs(got - ref) <= ref * 2.0**-8 * 1.001 + 1e-30).all(), np.abs(got / ref - 1).max()
    assert (got[..., -1] == 0).all()


@pytest.mark.parametrize("cols", [128, 197, 384, 48])
@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_norms(tmp_path, op, cols):
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(cols).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(cols).astype(np.float32), "b")]
    inputs = ["x", "g", "b"] if op == "LayerNormalization" else ["x", "g"]
    model = model_from_nodes([helper.make_node(op, inputs, ["y"], axis=-1, epsilon=1e-5)], [("x", [2, 21, cols])],
                   [("y", [2, 21, cols])], inits, opset=23 if op == "RMSNormalization" else 17)
    result = compile_and_compare(model, tmp_path)
    assert set(result.kernels.values()) == {"reduction"}, result.kernels


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceSum"])
def test_bare_row_reduction_is_taken_by_the_reduction_rule(tmp_path, op):
    """A reduction whose rows are the output (attention's fully-masked-row guard: a row max of a mask)."""
    model = model_from_nodes([helper.make_node(op, ["x"], ["y"], keepdims=1, axes=[-1])], [("x", [2, 3, 5, 37])],
                             [("y", [2, 3, 5, 1])], opset=13 if op == "ReduceMax" else 11)
    result = compile_and_compare(model, tmp_path)
    assert set(result.kernels.values()) == {"reduction"}, result.kernels


@pytest.mark.parametrize("cols, halvings", [(384, 3), (48, 2), (40, 0)])
def test_row_statistics_are_halved_in_vectors_before_the_scalar_sum(cols, halvings):
    """A layer norm row's lane partials (32 lanes for 384 columns, 16 for 48) are halved by vector adds
    down to TREE_LEFT before the final scalar sum (was: 32 dependent scalar adds per statistic); a row
    that does not split into lanes keeps its scalar loop. Same values as numpy."""
    import tvm
    from tvm import te

    from effc.codegen.schedules.cpu.reduction import TREE_LEFT, RowReduction
    from effc.codegen.target import llvm_target

    rows = 7
    x = te.placeholder((rows, cols), "float32", name="x")
    k1, k2 = te.reduce_axis((0, cols), "k1"), te.reduce_axis((0, cols), "k2")
    total = te.compute((rows,), lambda i: te.sum(x[i, k1], axis=k1), name="total")
    mean = te.compute((rows,), lambda i: total[i] / cols, name="mean")
    sq = te.compute((rows,), lambda i: te.sum((x[i, k2] - mean[i]) * (x[i, k2] - mean[i]), axis=k2), name="sq")
    y = te.compute((rows, cols), lambda i, j: (x[i, j] - mean[i]) * te.rsqrt(sq[i] / cols + 1e-5), name="y")
    target = llvm_target(2).tvm()
    sch = RowReduction().apply(te.create_prim_func([x, y]), target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert text.count("_rf_update") == 2 * (1 + halvings) if halvings else "_rf" not in text, text
    if halvings:
        assert f"T.axis.reduce({TREE_LEFT}," in text, text  # the final sum: TREE_LEFT scalar steps
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target).jit()
    data = (np.random.default_rng(4).standard_normal((rows, cols)) * 3 + 1).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((rows, cols), np.float32))
    lib["main"](tvm.runtime.tensor(data), out)
    centred = data - data.mean(-1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5),
                               rtol=1e-5, atol=1e-5)
