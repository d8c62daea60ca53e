"""fold-batchnorm through reshapes that keep the channel axis: torch's BatchNorm1d on
``linear(x).flatten(0, 1)`` (LeViT's Linear + BatchNorm1d), and the reshapes it must refuse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from effc.frontend.onnx import from_proto
from effc.ir import op_counts
from tests.passes.batchnorm_models import bn_params, fold, onnx_model, randomise_bn, refuse


def _reshape_sandwich(x_shape: list[int], to: list[int], back: list[int] | None, bias: bool,
                      graph_output_h: bool = False) -> onnx.ModelProto:
    """x @ W (+ B) -> Reshape(to) -> BN (channels on axis 1) [-> Reshape(back)]."""
    rng = np.random.default_rng(len(to) + 3 * bias)
    c_in, c = x_shape[-1], to[1]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc")]
    inits = [numpy_helper.from_array(rng.standard_normal((c_in, c)).astype(np.float32), "W")]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "B"], ["h"], name="bias"))
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "B"))
    h = "h" if bias else "mm"
    nodes += [helper.make_node("Reshape", [h, "to"], ["flat"], name="flatten"),
              helper.make_node("BatchNormalization", ["flat", "gamma", "beta", "mean", "var"],
                               ["n" if back else "y"], name="bn")]
    inits += [numpy_helper.from_array(np.array(to, np.int64), "to"), *bn_params(c, rng, np.float32)]
    if back:
        nodes.append(helper.make_node("Reshape", ["n", "back"], ["y"], name="unflatten"))
        inits.append(numpy_helper.from_array(np.array(back, np.int64), "back"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, back or to)]
    if graph_output_h:
        outputs.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, x_shape[:-1] + [c]))
    return onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs, inits)


@pytest.mark.parametrize("bias", [False, True])
def test_flatten_bn_reshape_back_folds_and_drops_the_round_trip(bias):
    folded, outcome = fold(from_proto(_reshape_sandwich([2, 5, 6], [10, 4], [2, 5, 4], bias)), 1)
    assert [(r.node, r.action, r.details["into"]) for r in outcome.rewrites] == [("bn", "fold-after", "fc")]
    # Both reshapes undo each other once the BN is gone.
    assert op_counts(folded) == {"Add": 1, "MatMul": 1}


@pytest.mark.parametrize("to", [[10, 4], [10, 4, 1]], ids=str)
def test_reshapes_keeping_the_channel_fold(to):
    folded, _ = fold(from_proto(_reshape_sandwich([2, 5, 6], to, None, bias=True)), 1)
    assert op_counts(folded) == {"Add": 1, "MatMul": 1, "Reshape": 1}


def test_channel_axis_not_last_through_conv_output():
    """Conv [2, 4, 3, 5] -> Reshape [2, 4, 15] -> BN -> Reshape back: channels on axis 1 throughout."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "to"], ["flat"], name="flatten"),
             helper.make_node("BatchNormalization", ["flat", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Reshape", ["n", "back"], ["y"], name="unflatten")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([2, 4, 15], np.int64), "to"),
             numpy_helper.from_array(np.array([2, 4, 3, 5], np.int64), "back"), *bn_params(4, rng, np.float32)]
    proto = onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 5])], inits)
    folded, _ = fold(from_proto(proto), 1)
    assert op_counts(folded) == {"Conv": 1}


def test_transpose_in_the_chain_keeps_the_reshape_after():
    """[2, 5, 4] -> Transpose [2, 4, 5] -> Reshape [2, 4, 5] ... the round trip is not a pure reshape."""
    proto = _reshape_sandwich([2, 5, 6], [10, 4], [2, 5, 4], bias=False)
    graph = proto.graph
    graph.node.insert(1, helper.make_node("Transpose", ["mm"], ["mt"], name="swap", perm=[1, 0, 2]))
    graph.node[2].input[0] = "mt"
    folded, _ = fold(from_proto(proto), 1)
    assert op_counts(folded) == {"Add": 1, "MatMul": 1, "Reshape": 2, "Transpose": 1}


# --- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, to", [([2, 3, 6], [2, 4, 3]), ([2, 5, 6], [1, 4, 10])], ids=str)
def test_refuses_a_reshape_that_moves_the_channel_axis(x_shape, to):
    # Reshapes, not transposes: 4 channels then 3 (or 10) elements per channel, 1 in the linear's
    # output [.., 4], so elements land on other channels.
    source = x_shape[:-1] + [4]
    refuse(from_proto(_reshape_sandwich(x_shape, to, None, bias=True)),
           f"Reshape 'flatten' moves the channel axis ({to} -> {source})")


def test_refuses_when_the_linear_output_is_read_elsewhere():
    refuse(from_proto(_reshape_sandwich([2, 5, 6], [10, 4], [2, 5, 4], bias=True, graph_output_h=True)),
           "Reshape 'flatten' input has other readers")


# --- the real thing: LeViT from transformers (random init, torch.onnx.export defaults) ----------

def _levit_onnx(tmp_path) -> onnx.ModelProto:
    from transformers import LevitConfig, LevitForImageClassification

    config = LevitConfig(image_size=32, patch_size=16, hidden_sizes=[16, 24], num_attention_heads=[2, 3],
                         depths=[1, 1], key_dim=[4, 4], mlp_ratio=[2, 2], attention_ratio=[2, 2],
                         down_ops=[["Subsample", 4, 2, 2, 2, 2]], num_labels=3)
    torch.manual_seed(0)
    model = randomise_bn(LevitForImageClassification(config), seed=1)
    path = tmp_path / "levit.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path))
    return onnx.load(path)


@pytest.mark.filterwarnings("ignore:The tensor attributes")  # LeViT caches its attention biases at export
def test_levit_every_batchnorm_folds(tmp_path):
    proto = _levit_onnx(tmp_path)
    bns = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)
    assert bns == 14  # Linear + BatchNorm1d in attention, MLP and subsampling, and the head's BN
    folded, outcome = fold(from_proto(proto), bns)
    # All but the head's BN follow a linear (through flatten(0, 1)); the head's precedes one.
    before = [r for r in outcome.rewrites if r.action != "fold-after"]
    assert len(before) == 1 and before[0].details["into_op"] == "Gemm", outcome.rewrites
    assert op_counts(folded)["Reshape"] < op_counts(from_proto(proto))["Reshape"]
