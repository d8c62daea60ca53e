"""GPT-2's fused QKV projection split into heads without a split kernel: in a QDQ copy the split
moves bytes (effc.codegen.qdq_hoist.drop_split_requantize), and at every precision its pieces are
strided slices fused into the head layout kernels (effc.codegen.split_views). Batch 2, odd seq,
3 heads, a causal mask; agreement with ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

from effc.codegen.build import compile_model  # noqa: E402
from effc.codegen.qdq_hoist import drop_split_requantize  # noqa: E402
from effc.codegen.runtime import load_compiled  # noqa: E402
from tests.codegen.qdq_models import calibration, float_attention, quantize_qdq  # noqa: E402
from tests.codegen.test_int8_qdq import ALL_OPS, compile_and_compare, ort_run, requires_vnni, step_of  # noqa: E402

BATCH, SEQ, HEADS, HEAD_DIM = 2, 9, 3, 8
SHAPE = [BATCH, SEQ, HEADS * HEAD_DIM]


def causal_qkv(**kw):
    return float_attention(BATCH, SEQ, HEADS, HEAD_DIM, mask="causal", fused_qkv=True, **kw)


def qdq_copy(tmp_path) -> str:
    return quantize_qdq(causal_qkv(), tmp_path / "a.onnx", calibration(SHAPE), op_types=ALL_OPS + ("Split",))


def test_split_of_requantized_pieces_moves_bytes_bit_exactly(tmp_path):
    path = qdq_copy(tmp_path)
    model = onnx.load(path)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers[split.input[0]] == "DequantizeLinear"  # ORT wraps the split in DQ -> Split -> Q
    quantizes = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    feed = {"x": calibration(SHAPE, 1, seed=9)[0]}
    before = ort_run(path, feed)
    assert drop_split_requantize(model) == 3
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert producers[split.input[0]] == "QuantizeLinear"  # the split reads the projection's bytes
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == quantizes - 3
    onnx.save(model, tmp_path / "dropped.onnx")
    np.testing.assert_array_equal(ort_run(tmp_path / "dropped.onnx", feed), before)


@pytest.mark.parametrize("per_piece_scale", [False, True])
def test_split_stays_where_a_piece_has_its_own_parameters(tmp_path, per_piece_scale):
    model = onnx.load(qdq_copy(tmp_path))
    if per_piece_scale:  # the first piece's Q takes a scale of its own: not the same bytes
        q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] == next(s for s in model.graph.node if s.op_type == "Split").output[0])
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "own_scale"))
        q.input[1] = "own_scale"
        assert drop_split_requantize(model) == 0
    else:
        assert drop_split_requantize(model) == 3


@requires_vnni
def test_int8_causal_attention_has_no_split_or_float_head_pass(tmp_path):
    path = qdq_copy(tmp_path)
    feed = {"x": calibration(SHAPE, 1, seed=9)[0]}
    # one step of y (in float32: a hair over it), as without this change: a few outputs round the
    # other way in the float softmax, not in the moved bytes
    res, _ = compile_and_compare(path, tmp_path / "out", feed, step_of(path, "y_scale") * (1 + 1e-5))
    assert not [k for k in res.kernels if "split" in k], list(res.kernels)
    heads = [k for k in res.kernels if "transpose" in k and "matmul" not in k]
    assert heads and not [k for k in heads if "dequantize" in k], heads  # heads move bytes, no float pass


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "haswell"])
def test_fp32_split_pieces_are_read_in_place(tmp_path, mcpu):
    """No kernel copies a Split's pieces: on AVX-512 the fused attention reads them as views of the
    qkv linear's output (effc.codegen.fused_attention); elsewhere each piece's slice fuses into its
    head layout kernel."""
    from effc.codegen.fused_attention import has_avx512
    from effc.codegen.target import BuildTarget, host_threads, llvm_target

    model = causal_qkv()
    bt = BuildTarget("llvm", llvm_target(mcpu=mcpu).spec, host_threads())
    res = compile_model(ir.from_proto(model), bt, tmp_path / "out")
    assert not [k for k in res.kernels if "split" in k], list(res.kernels)
    if has_avx512(bt.tvm()):
        assert res.rule_hits.get("attention-f32") and not [k for k in res.kernels if "strided_slice" in k], \
            list(res.kernels)
    else:
        assert [k for k in res.kernels if "strided_slice" in k and "transpose" in k], list(res.kernels)
    feed = {"x": np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)}
    onnx.save(model, tmp_path / "f.onnx")
    got = load_compiled(tmp_path / "out")(feed)
    np.testing.assert_allclose(got[next(iter(got))], ort_run(tmp_path / "f.onnx", feed), rtol=1e-4, atol=1e-4)
