"""effc.ShiftAddMatMul: the ONNX function body (run by ONNX Runtime) equals the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effc.ops import DOMAIN, use
from effc.ops import shift_add_matmul as op
from effc.verify import OrtRunner


def packed(rng, q, n, k, group, terms):
    planes = op.pack_planes(rng.choice([-1, 1], size=(q, n, k)))
    signs = rng.choice([-1, 0, 1], size=(q, n, k // group, terms))
    codes = op.encode_terms(signs, rng.integers(-10, 4, size=signs.shape))
    return planes, codes, rng.standard_normal(n).astype(np.float32)


def one_op_model(x_shape, planes, codes, bias, opset=23) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    consts = [ir.Value(name=n, const_value=ir.tensor(a, name=n))
              for n, a in (("planes", planes), ("codes", codes), ("bias", bias))]
    node = ir.Node(DOMAIN, op.NAME, [x, *consts], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=consts, opset_imports={"": opset})
    model = ir.Model(graph, ir_version=10)
    use(model, op.function(opset))
    return model


@settings(max_examples=12, deadline=None)
@given(q=st.integers(1, 4), n=st.integers(1, 9), k8=st.integers(1, 4), group=st.sampled_from([4, 8, 16]),
       terms=st.integers(1, 3), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), seed=st.integers(0, 99))
def test_function_matches_reference(q, n, k8, group, terms, lead, seed):
    k = 8 * k8 * (group // 4 if group > 8 else 1)
    rng = np.random.default_rng(seed)
    planes, codes, bias = packed(rng, q, n, k, group, terms)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    got = OrtRunner(one_op_model(list(x.shape), planes, codes, bias))({"x": x})["y"]
    want = op.reference(x, planes, codes, bias)
    assert got.shape == tuple(op.output_shape(list(x.shape), list(planes.shape)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_packing_layout_is_lsb_first():
    signs = -np.ones((1, 1, 16))
    signs[0, 0, [0, 9]] = 1  # column 0 -> bit 0 of byte 0, column 9 -> bit 1 of byte 1
    assert op.pack_planes(signs).tolist() == [[[1, 2]]]
    np.testing.assert_array_equal(op.unpack_planes(op.pack_planes(signs)), signs)


def test_codes_are_signed_powers_of_two():
    codes = op.encode_terms(np.array([[1.0, -1.0, 0.0]]), np.array([[-3, 2, 5]]))
    assert op.decode_scales(codes[None, None]).item() == pytest.approx(2.0 ** -3 - 4.0)
    with pytest.raises(ValueError):
        op.encode_terms(np.array([1.0]), np.array([100]))
