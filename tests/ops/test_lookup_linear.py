"""effc.LookupLinear: the ONNX function body (run by ONNX Runtime) equals the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from effc.errors import EffcError
from effc.ops import DOMAIN, use
from effc.ops import lookup_linear as op
from effc.ops.registry import lookup
from effc.verify import OrtRunner


def one_op_model(x_shape, consts, encoder, v, soft, opset=17) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    values = [ir.Value(name=n, const_value=ir.tensor(a, name=n))
              for n, a in zip(("encoder_const", "tables", "table_scale", "bias"), consts)]
    node = ir.Node(DOMAIN, op.NAME, [x, *values], num_outputs=1,
                   attributes=[ir.AttrString("encoder", encoder), ir.AttrInt64("v", v), ir.AttrInt64("soft", soft)])
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=values, opset_imports={"": opset})
    model = ir.Model(graph, ir_version=10)
    use(model, op.function(opset))
    return model


def constants(rng, encoder, chunks, v, k, n, dtype):
    if encoder == "pq":
        encoder_const = rng.standard_normal((chunks, k, v)).astype(np.float32)
    else:
        encoder_const = (0.3 * rng.standard_normal((chunks, v))).astype(np.float32)
        k = 2 ** v
    if dtype == "int8":
        tables = rng.integers(-127, 128, size=(chunks, k, n)).astype(np.int8)
        scale = rng.uniform(0.01, 0.1, chunks).astype(np.float32)
    else:
        tables = rng.standard_normal((chunks, k, n)).astype(np.float32)
        scale = np.ones(chunks, np.float32)
    return encoder_const, tables, scale, rng.standard_normal(n).astype(np.float32)


CASES = [  # encoder, soft, chunks, v, k, n, table dtype, lead dims of X (batch 2, ranks 2-4), opset
    ("pq", 0, 3, 4, 16, 5, "int8", (2,), 17),
    ("pq", 0, 2, 16, 16, 7, "float32", (2, 3), 18),
    ("pq", 0, 5, 2, 3, 4, "float32", (2, 1, 3), 15),
    ("hash", 0, 4, 4, None, 6, "int8", (2, 5), 18),
    ("hash", 1, 3, 5, None, 3, "float32", (2,), 17),
    ("hash", 1, 2, 8, None, 9, "int8", (2, 2, 3), 21),
]


@pytest.mark.parametrize("encoder,soft,chunks,v,k,n,dtype,lead,opset", CASES)
def test_function_matches_reference(encoder, soft, chunks, v, k, n, dtype, lead, opset):
    rng = np.random.default_rng(len(lead) * 7 + chunks)
    consts = constants(rng, encoder, chunks, v, k, n, dtype)
    x = rng.standard_normal((*lead, chunks * v)).astype(np.float32)
    x.reshape(-1)[:v] = 0.0  # exact ties: the first centroid index / a 0 bit
    got = OrtRunner(one_op_model(list(x.shape), consts, encoder, v, soft, opset))({"x": x})["y"]
    want = op.reference(x, *consts, encoder=encoder, soft=soft)
    assert got.shape == (*lead, n) == tuple(op.output_shape(list(x.shape), list(consts[1].shape)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reference_semantics_by_hand():
    # two chunks of 2 dims; pq: the nearest of 3 centroids, first index on a tie
    centroids = np.array([[[0, 0], [1, 1], [1, 1]], [[5, 5], [-1, 0], [0, -1]]], np.float32)
    tables = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    x = np.array([[0.9, 1.2, -0.4, -0.6]], np.float32)  # chunk 0 -> 1 (not 2), chunk 1 -> 2
    assert op.encode(x, "pq", centroids).tolist() == [[1, 2]]
    y = op.reference(x, centroids, tables, np.ones(2, np.float32), np.array([0.5], np.float32), "pq")
    assert y.tolist() == [[1.0 + 5.0 + 0.5]]
    # hash: bit i is x_i > centre_i; a value on its centre is a 0 bit
    centres = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    x = np.array([[0.5, 1.0, -1.0, 2.0]], np.float32)
    assert op.encode(x, "hash", centres).tolist() == [[1, 2]]
    weights = op.soft_weights(x, centres)
    sig = lambda t: 1 / (1 + np.exp(-2 * t))  # noqa: E731
    np.testing.assert_allclose(weights, [[sig(0.5) * 0.5, sig(1.0) * sig(2.0)]])


def test_registered_without_kernels_and_checks_layout():
    registered = lookup(DOMAIN, op.NAME)
    assert registered is not None and registered.packed == (1, 2, 3)
    rng = np.random.default_rng(0)
    consts = constants(rng, "hash", 2, 3, None, 4, "int8")
    node = one_op_model([2, 6], consts, "hash", 3, 1).graph[0]
    registered.check("n", node, list(consts[:3]))  # fits
    with pytest.raises(EffcError, match=r"hash needs centres float32 \[C, v\] with v=3, got float32\[1, 2, 3\]"):
        registered.check("n", node, [consts[0][None], *consts[1:3]])
    with pytest.raises(EffcError, match="do not match 2 chunks of 8 codes"):
        registered.check("n", node, [consts[0], consts[1][:, :4], consts[2]])
    wrong = one_op_model([2, 6], consts, "hash", 2, 0).graph[0]
    with pytest.raises(EffcError, match="v=2"):
        registered.check("n", wrong, list(consts[:3]))
