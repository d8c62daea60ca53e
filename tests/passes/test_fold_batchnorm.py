"""fold-batchnorm: rewrite counts, resulting graphs, refusals and agreement with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from effc.frontend.onnx import from_proto
from effc.ir import const_value, op_counts
from effc.passes.base import PassContext
from effc.passes.fold_batchnorm import FoldBatchNorm
from tests.passes.batchnorm_models import (
    bn_params,
    export,
    export_unoptimized,
    fold,
    onnx_model,
    refuse,
)


class TokenBN(nn.Module):
    """BatchNorm1d over the channels of a token tensor [B, N, C], as exporters see it."""

    def __init__(self, c: int, repbn: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm1d(c)
        self.alpha = nn.Parameter(torch.tensor(0.37)) if repbn else None

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x if self.alpha is not None else self.bn(x)
        return x.transpose(1, 2)


# --- BN after a linear ------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_bn(bias):
    model = export_unoptimized(nn.Sequential(nn.Conv2d(3, 5, 3, bias=bias), nn.BatchNorm2d(5)), torch.randn(1, 3, 8, 8))
    assert op_counts(model) == {"BatchNormalization": 1, "Conv": 1}
    folded, outcome = fold(model, 1)
    assert outcome.rewrites[0].details["into_op"] == "Conv" and outcome.rewrites[0].action == "fold-after"
    assert op_counts(folded) == {"Conv": 1}
    conv = next(iter(folded.graph))
    assert const_value(conv.inputs[2]).shape == (5,)


def test_linear_then_bn_on_batch():
    model = export_unoptimized(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), torch.randn(3, 6))
    output_name = model.graph.outputs[0].name
    folded, _ = fold(model, 1)
    assert op_counts(folded) == {"Gemm": 1}
    assert folded.graph.outputs[0].name == output_name


@pytest.mark.parametrize("bias", [True, False])
def test_token_linear_then_bn(bias):
    model = export(nn.Sequential(nn.Linear(8, 6, bias=bias), TokenBN(6)), torch.randn(2, 5, 8))
    assert op_counts(model)["Transpose"] == 2
    folded, outcome = fold(model, 1)
    # The Transpose pair goes with the BN; a bias-free linear gets the BN shift as a new Add.
    assert op_counts(folded) == {"Add": 1, "MatMul": 1}
    assert outcome.rewrites[0].action == "fold-after"


def test_token_linear_then_repbn():
    model = export(nn.Sequential(nn.Linear(8, 6), TokenBN(6, repbn=True)), torch.randn(2, 5, 8))
    folded, outcome = fold(model, 1)
    assert op_counts(folded) == {"Add": 1, "MatMul": 1}
    assert outcome.rewrites[0].details["repbn"]


# --- BN before a linear -----------------------------------------------------------------------

def test_token_bn_before_linear():
    model = export(nn.Sequential(TokenBN(8), nn.Linear(8, 6)), torch.randn(2, 5, 8))
    folded, outcome = fold(model, 1)
    assert op_counts(folded) == {"Add": 1, "MatMul": 1}
    assert outcome.rewrites[0].action == "fold-before"


class RepBNBeforeQKV(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.norm = TokenBN(c, repbn=True)
        self.q, self.k, self.v = nn.Linear(c, 4), nn.Linear(c, 4, bias=False), nn.Linear(c, 6)

    def forward(self, x):
        x = self.norm(x)
        return self.q(x), self.k(x), self.v(x)


def test_repbn_before_separate_qkv():
    model = export(RepBNBeforeQKV(), torch.randn(2, 5, 8))
    folded, outcome = fold(model, 3)
    assert all(r.details["repbn"] and r.action == "fold-before" for r in outcome.rewrites)
    assert op_counts(folded) == {"Add": 3, "MatMul": 3}


class FinalRepBNHead(nn.Module):
    """DeiT-style classifier: final RepBN, class token x[:, 0], linear head."""

    def __init__(self, c: int = 8, classes: int = 3):
        super().__init__()
        self.norm = TokenBN(c, repbn=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.drop(self.norm(x)[:, 0]))


def test_final_repbn_then_class_token_head():
    model = export(FinalRepBNHead(), torch.randn(2, 5, 8))
    folded, outcome = fold(model, 1)
    assert outcome.rewrites[0].details["repbn"] and outcome.rewrites[0].details["into_op"] == "Gemm"
    assert "Mul" not in op_counts(folded) and "Transpose" not in op_counts(folded)
    assert op_counts(folded)["Gather"] == 1


def test_bn_before_reshape_to_rows():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = TokenBN(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.norm(x).reshape(-1, 8))

    fold(export(Flat(), torch.randn(2, 5, 8)), 1)


def test_bn_before_unpadded_conv():
    model = export(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 7, 7))
    folded, outcome = fold(model, 1)
    assert op_counts(folded) == {"Conv": 1}
    assert outcome.rewrites[0].action == "fold-before"


# --- refusals ---------------------------------------------------------------------------------

def test_refuses_bn_feeding_a_residual_add():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = TokenBN(8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.norm(x)
            return y + self.fc(y)

    refuse(export(Residual(), torch.randn(2, 5, 8)), "other consumers: Add")


def test_refuses_bn_before_padded_conv():
    model = export(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), torch.randn(1, 3, 7, 7))
    refuse(model, "padding [1, 1, 1, 1]")


def test_refuses_matmul_with_runtime_weight():
    class RuntimeWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x, w):
            return self.bn(x @ w)

    refuse(export(RuntimeWeight(), torch.randn(3, 6), torch.randn(6, 4)), "is not constant")


def test_refuses_slicing_the_channel_axis():
    class SliceChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = TokenBN(8), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.norm(x)[..., :4])

    refuse(export(SliceChannels(), torch.randn(2, 5, 8)), "indexes the channel axis")


def test_refuses_non_constant_statistics_and_training_mode():
    proto = _bn_after_matmul_proto(4, 1e-5, np.float32)
    proto.graph.input.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [4]))
    proto.graph.initializer.remove(next(t for t in proto.graph.initializer if t.name == "mean"))
    refuse(from_proto(proto), "non-constant BN parameters (mean)")

    model = ir.serde.deserialize_model(_bn_after_matmul_proto(4, 1e-5, np.float32))
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    bn.attributes["training_mode"] = ir.AttrInt64("training_mode", 1)
    outcome = FoldBatchNorm().run(model, PassContext())
    assert outcome.rewrites == [] and "training_mode=1" in outcome.skipped[0].reason


# --- onnx.helper graphs: Gemm attributes, tied weights, fp16, shapes --------------------------

def _bn_after_matmul_proto(c: int, eps: float, dtype) -> onnx.ModelProto:
    rng = np.random.default_rng(c)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn",
                              epsilon=eps)]
    inits = [numpy_helper.from_array(rng.standard_normal((6, c)).astype(dtype), "W"), *bn_params(c, rng, dtype)]
    return onnx_model(nodes, [helper.make_tensor_value_info("x", elem, [3, 6])],
                  [helper.make_tensor_value_info("y", elem, [3, c])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bn_first", [False, True])
def test_gemm_alpha_beta_trans_b(trans_b, bn_first):
    rng = np.random.default_rng(trans_b)
    c_in, c_out = 5, 4
    channels = c_in if bn_first else c_out
    w = rng.standard_normal((c_out, c_in) if trans_b else (c_in, c_out)).astype(np.float32)
    gemm_in, gemm_out = ("n", "y") if bn_first else ("x", "h")
    nodes = [helper.make_node("Gemm", [gemm_in, "W", "C"], [gemm_out], name="gemm", alpha=0.7, beta=0.3, transB=trans_b),
             helper.make_node("BatchNormalization", ["x" if bn_first else "h", "gamma", "beta", "mean", "var"],
                              ["n" if bn_first else "y"], name="bn")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "C"),
             *bn_params(channels, rng, np.float32)]
    proto = onnx_model(nodes[::-1] if bn_first else nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, c_in])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, c_out])], inits)
    folded, outcome = fold(from_proto(proto), 1)
    assert outcome.rewrites[0].action == ("fold-before" if bn_first else "fold-after")
    assert next(iter(folded.graph)).attributes.get_float("beta") == 1.0


def test_tied_weight_read_elsewhere_is_not_changed():
    proto = _bn_after_matmul_proto(4, 1e-5, np.float32)
    proto.graph.node.append(helper.make_node("MatMul", ["x", "W"], ["z"], name="tied"))
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4]))
    original = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W"))
    folded, _ = fold(from_proto(proto), 1)
    tied = next(n for n in folded.graph if n.name == "tied")
    np.testing.assert_array_equal(const_value(tied.inputs[1]), original)


def test_fp16_weights_stay_fp16():
    folded, _ = fold(from_proto(_bn_after_matmul_proto(4, 1e-5, np.float16)), 1, tolerance=5e-3)
    matmul = next(n for n in folded.graph if n.op_type == "MatMul")
    assert const_value(matmul.inputs[1]).dtype == np.float16


def _token_proto(c: int, eps: float, alpha: np.ndarray | None, bn_first: bool) -> onnx.ModelProto:
    """[2, 3, c] tokens: Transpose -> BN (-> RepBN) -> Transpose around a MatMul + bias."""
    rng = np.random.default_rng(c)
    site = "x" if bn_first else "h"
    nodes = [helper.make_node("Transpose", [site], ["t"], perm=[0, 2, 1]),
             helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["n"], epsilon=eps, name="bn")]
    inits = bn_params(c, rng, np.float32)
    if alpha is not None:
        nodes += [helper.make_node("Mul", ["t", "alpha"], ["m"]), helper.make_node("Add", ["m", "n"], ["r"])]
        inits.append(numpy_helper.from_array(alpha.astype(np.float32), "alpha"))
    nodes.append(helper.make_node("Transpose", ["r" if alpha is not None else "n"], ["s" if bn_first else "y"], perm=[0, 2, 1]))
    c_in, c_out = (c, 5) if bn_first else (5, c)
    linear = [helper.make_node("MatMul", ["s" if bn_first else "x", "W"], ["mm"], name="fc"),
              helper.make_node("Add", ["B", "mm"], ["y" if bn_first else "h"])]
    inits += [numpy_helper.from_array(rng.standard_normal((c_in, c_out)).astype(np.float32), "W"),
              numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "B")]
    return onnx_model(nodes + linear if bn_first else linear + nodes,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, c_in])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, c_out])], inits)


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 24), eps=st.floats(1e-6, 1e-1), alpha=st.sampled_from(["none", "scalar", "per-channel"]),
       bn_first=st.booleans())
def test_token_sites_fold_for_any_width_and_eps(c, eps, alpha, bn_first):
    rng = np.random.default_rng(c)
    alpha_value = {"none": None, "scalar": np.array(rng.uniform(-1, 1)),
                   "per-channel": rng.uniform(-1, 1, (c, 1))}[alpha]
    folded, _ = fold(from_proto(_token_proto(c, eps, alpha_value, bn_first)), 1)
    assert op_counts(folded) == {"Add": 1, "MatMul": 1}
