"""The lookup pass: linears -> effc.LookupLinear fitted on calibration data (pq and sign-hash encoders)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.calib import Reservoir
from effc.errors import EffcError
from effc.frontend.onnx import from_proto
from effc.ir import const_value, op_counts
from effc.ops import lookup_linear as op
from effc.passes import get_pass
from effc.passes._lookup_fit import _gauss_seidel, hash_centres, kmeans, refit, representatives
from effc.passes.base import PassContext
from effc.passes.lookup import Lookup
from effc.pipeline import run_pipeline
from effc.verify import OrtRunner
from tests.helpers import effc
from tests.passes.shift_add_models import feeds, mlp


def batched(proto):
    """The mlp with a symbolic batch axis."""
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def run(proto, calibration, **options):
    model = from_proto(proto)
    result = run_pipeline(model, [get_pass("lookup")], feeds=feeds(2, seed=99), options={"lookup": options},
                          calibration=calibration)
    return result.model, result.records[0]


def lookup_nodes(model):
    return [n for n in model.graph if n.op_type == op.NAME]


def forward(model, x):
    """The rewritten mlp by the op's numpy reference (relu between layers), layer by layer."""
    h = x
    nodes = lookup_nodes(model)
    for i, node in enumerate(nodes):
        consts = [const_value(v) for v in node.inputs[1:]]
        attrs = node.attributes
        h = op.reference(h, *consts, encoder=attrs.get_string("encoder"), soft=attrs.get_int("soft"))
        if i < len(nodes) - 1:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("options", [{"v": 8}, {"v": 4, "k": 8, "table_dtype": "float32"},
                                     {"encoder": "hash"}, {"encoder": "hash", "v": 4, "soft": False},
                                     {"encoder": "hash", "centres": "median", "v": 8}])
def test_rewritten_model_runs_in_ort_and_equals_reference(options):
    model, record = run(batched(mlp()), feeds(16), layers="fc*", **options)
    assert record.status == "applied", record.note
    assert [r.node for r in record.rewrites] == ["fc0", "fc1", "fc2"]
    assert op_counts(model).get("effc.LookupLinear") == 3 and op_counts(model).get("MatMul", 0) == 0
    encoder, v = options.get("encoder", "pq"), options["v"] if "v" in options else (16 if "encoder" not in options else 2)
    soft = options.get("soft", encoder == "hash")  # hash weights its rows unless told not to
    for node in lookup_nodes(model):
        assert node.attributes.get_string("encoder") == encoder and node.attributes.get_int("v") == v
        assert node.attributes.get_int("soft") == int(soft)
        tables = const_value(node.inputs[2])
        assert tables.dtype == np.dtype(options.get("table_dtype", "int8"))
        assert tables.shape[1] == (options.get("k", 16) if encoder == "pq" else 2 ** v)
    x = np.random.default_rng(5).standard_normal((2, 16, 32)).astype(np.float32)  # batch 2
    np.testing.assert_allclose(OrtRunner(model)({"x": x})["y"], forward(model, x), rtol=1e-4, atol=1e-4)


def test_ends_kept_dense_unless_selected():
    model, record = run(mlp(), feeds(8), v=8)
    assert [(r.node, r.action) for r in record.rewrites] == [("fc1", "lookup")]
    reasons = {s.node: s.reason for s in record.skipped}
    assert "first layer" in reasons["fc0"] and "last layer" in reasons["fc2"]
    details = record.rewrites[0].details
    assert details["mac_fraction"] == pytest.approx(64 * 32 / (32 * 64 + 64 * 32 + 32 * 16))
    node = lookup_nodes(model)[0]
    assert details["table_bytes"] == sum(const_value(v).nbytes for v in node.inputs[1:4])


def test_layer_records_measure_each_layer_on_the_calibration_rows():
    proto, calibration = mlp(), feeds(8)
    model, record = run(proto, calibration, layers="fc1", v=8)
    assert [layer.node for layer in record.layers] == ["fc1"] and record.layers[0].data == "calibration (8 samples)"
    layer = record.layers[0]
    w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = lookup_nodes(model)[0]
    consts = [const_value(v) for v in node.inputs[1:]]
    # 8 x 16 rows < the reservoir: every calibration row of fc1's float input
    x = np.concatenate([np.maximum(f["x"][0] @ w["W0"] + w["b0"], 0) for f in calibration])
    y, y_new = x.astype(np.float64) @ w["W1"] + w["b1"], op.reference(x, *consts, encoder="pq").astype(np.float64)
    rel = np.linalg.norm(y_new - y) / np.linalg.norm(y)
    cosine = np.sum(y * y_new) / (np.linalg.norm(y) * np.linalg.norm(y_new))
    assert 1e-3 < rel < 0.5
    np.testing.assert_allclose([layer.rel_error, layer.cosine], [rel, cosine], rtol=1e-4)
    assert layer.bytes_before == (64 * 32 + 32) * 4
    assert layer.bytes_after == sum(c.nbytes for c in consts)
    centroids, tables = consts[0], consts[1]
    assert centroids.shape == (8, 16, 8) and tables.shape == (8, 16, 32)  # C = 64/8 chunks of 16 codes


@pytest.mark.parametrize("encoder", ["pq", "hash"])
def test_refit_beats_no_refit_on_held_out_data(encoder):
    held_out = feeds(4, seed=123)
    errors = {}
    for refit_tables in (False, True):
        # 2048 rows for 16 chunks x 16 codes: with far fewer rows than that a joint refit overfits
        model, record = run(mlp(), feeds(128), layers="fc1", encoder=encoder, v=4, refit=refit_tables)
        dense = OrtRunner(from_proto(mlp()))
        runner = OrtRunner(model)
        errors[refit_tables] = (record.layers[0].rel_error, np.mean(
            [np.linalg.norm(runner(f)["y"] - dense(f)["y"]) / np.linalg.norm(dense(f)["y"]) for f in held_out]))
    assert errors[True][0] < 0.9 * errors[False][0]  # on the calibration rows
    assert errors[True][1] < errors[False][1]  # and on data it was not fitted on


def test_joint_refit_solves_the_ridge_problem():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(300, 5))
    truth = rng.standard_normal((5, 4, 3))
    target = sum(truth[c, codes[:, c]] for c in range(5)) + 0.01 * rng.standard_normal((300, 3))
    start, weights, lam = np.zeros_like(truth), np.ones(codes.shape), 0.01 * 300 / 4

    def objective(tables):
        return np.sum((sum(tables[c, codes[:, c]] for c in range(5)) - target) ** 2) + lam * np.sum(tables ** 2)

    exact = refit(codes, weights, target, start, ridge=0.01)
    assert objective(exact) < 0.02 * objective(start)
    for perturbed in (exact + 0.01 * rng.standard_normal(exact.shape), exact * 0.99):
        assert objective(exact) < objective(perturbed)  # the minimum
    # the sweeps used above EXACT_SOLVE_MAX codes reach it within 1% of the start's excess objective
    iterative = _gauss_seidel(codes, weights, target, start, lam)
    assert objective(iterative) - objective(exact) < 0.01 * (objective(start) - objective(exact))


def test_sweeps_reach_the_exact_ridge_solution_with_soft_row_weights():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 4, size=(400, 6))
    weights = rng.uniform(0.3, 1.0, size=codes.shape)  # as MemoryFormer's soft weights
    target = rng.standard_normal((400, 5))
    start = rng.standard_normal((6, 4, 5))
    exact = refit(codes, weights, target, start, ridge=0.05)  # 24 codes: the factored normal equations
    swept = _gauss_seidel(codes, weights, target, start, lam=0.05 * 400 / 4, sweeps=300)
    assert np.allclose(swept, exact, atol=1e-9)  # converged: the same minimum, not an approximation of it


def test_lloyd_centres_are_the_best_one_bit_split_and_beat_the_median_on_skewed_dims():
    rng = np.random.default_rng(3)
    normal = rng.standard_normal((301, 2, 3))
    chunks = np.where(normal > 0, normal, 0.05 * normal)  # skewed, as after a (leaky) GELU
    chunks[:, 1, 2] = rng.exponential(size=301)

    def split_error(column, threshold):
        sides = [column[column > threshold], column[column <= threshold]]
        return sum(((side - side.mean()) ** 2).sum() for side in sides if len(side))

    lloyd, median = hash_centres(chunks), hash_centres(chunks, "median")
    assert np.allclose(median, np.median(chunks, axis=0))
    for c in range(2):
        for d in range(3):
            column = chunks[:, c, d].astype(np.float64)
            best = min(split_error(column, t) for t in np.unique(column)[:-1])  # every split, brute force
            assert split_error(column, lloyd[c, d]) == pytest.approx(best, rel=1e-9)
            assert split_error(column, lloyd[c, d]) < 0.9 * split_error(column, median[c, d])


def test_soft_bucket_start_fits_its_rows_weights():
    rng = np.random.default_rng(4)
    chunks = rng.standard_normal((200, 3, 2))
    centres = np.zeros((3, 2), np.float32)
    codes = op.encode(chunks.reshape(200, 6), "hash", centres)
    weights = op.soft_weights(chunks.reshape(200, 6), centres)
    points = representatives(chunks, "hash", centres, codes, 4, weights)
    c, j = 1, int(codes[0, 1])
    rows = codes[:, c] == j
    # w * point is the least-squares fit of the bucket's rows: no scale of it fits them better
    def misfit(point):
        return np.sum((weights[rows, c, None] * point[None] - chunks[rows, c]) ** 2)
    assert misfit(points[c, j]) < min(misfit(points[c, j] * s) for s in (0.9, 1.1))
    plain = representatives(chunks, "hash", centres, codes, 4)
    assert np.allclose(plain[c, j], chunks[rows, c].mean(axis=0))


def test_kmeans_reseeds_empty_clusters():
    rng = np.random.default_rng(1)
    # three distinct points per chunk, eight clusters asked: no centroid may be NaN or lost
    points = rng.standard_normal((2, 3, 4))
    chunks = points[:, rng.integers(0, 3, 90)].transpose(1, 0, 2)  # [R, C, v]
    centroids = kmeans(chunks, 8, 10, rng)
    assert np.isfinite(centroids).all()
    for c in range(2):
        for p in points[c]:
            assert np.min(np.abs(centroids[c] - p).sum(-1)) < 1e-5  # every distinct point is a centroid


def test_reservoir_is_bounded_and_uniform():
    counts = np.zeros(1000)
    for seed in range(200):
        sample = Reservoir(100, seed)
        for start in range(0, 1000, 37):  # blocks of odd sizes
            sample.add(np.arange(start, min(start + 37, 1000), dtype=np.float32)[:, None])
        assert sample.rows.shape == (100, 1) and sample.seen == 1000
        assert len(np.unique(sample.rows)) == 100
        counts[sample.rows[:, 0].astype(int)] += 1
    # each row is kept with probability 0.1: 20 expected per row over 200 draws
    assert abs(counts[:500].mean() - 20) < 2 and abs(counts[500:].mean() - 20) < 2


def test_model_without_linears_is_skipped_with_a_reason():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="act")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    outcome = Lookup().run(from_proto(proto), PassContext(calibration=[{"x": np.ones((2, 8), np.float32)}]))
    assert not outcome.changed and [(s.node, s.reason) for s in outcome.skipped] == [
        ("model", "no linear (MatMul/Gemm with a constant 2-D weight) to replace")]


def test_chunk_not_dividing_some_widths_skips_them():
    outcome = Lookup().run(from_proto(mlp(dims=(32, 20, 32, 16))),
                           PassContext(options={"layers": "fc*", "v": 8}, calibration=feeds(4)))
    reasons = {s.node: s.reason for s in outcome.skipped}
    assert reasons["fc1"] == "chunk size v=8 does not divide the input width K=20"
    assert [r.node for r in outcome.rewrites] == ["fc0", "fc2"]


@pytest.mark.parametrize("options, message", [
    ({"v": 5, "layers": "fc1"}, "lookup.v=5 divides the input width of none of the selected linears (K = 64)"),
    ({"k": 1}, "lookup.k=1: out of range"),
    ({"k": 300}, "lookup.k=300: out of range"),
    ({"encoder": "hash", "v": 9}, "lookup.v=9: hash chunks need 2^v codes"),
    ({"soft": True}, "lookup.soft=true needs lookup.encoder=hash"),
    ({"encoder": "lsh"}, "lookup.encoder=lsh: not accepted"),
    ({"encoder": "hash", "centres": "mean"}, "lookup.centres=mean: not accepted"),
])
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(EffcError, match=message.replace("^", r"\^").replace("(", r"\(").replace(")", r"\)")):
        Lookup().run(from_proto(mlp()), PassContext(options=options, calibration=feeds(2)))


def test_cli_exits_2_on_bad_options_and_without_calibration(tmp_path):
    import onnx

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in feeds(4)]))
    for args, message in ((["--set", "lookup.v=5", "--set", "lookup.layers=fc1", "--calib", tmp_path / "calib.npz"],
                           "lookup.v=5 divides the input width of none"),
                          (["--set", "lookup.k=1", "--calib", tmp_path / "calib.npz"], "lookup.k=1: out of range"),
                          ([], "pass 'lookup' needs calibration data")):
        proc = effc("compile", path, "-o", tmp_path / "out", "--passes", "lookup", *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr


def test_under_a_budget_converts_some_layers_fitted_on_the_fit_split_only():
    from effc.budget import Budget, output_cosine, split

    calibration = feeds(32, seed=1)
    original = OrtRunner(from_proto(mlp()))
    holdout = split(calibration)[1]

    def compile_with(budget):
        result = run_pipeline(from_proto(mlp()), [get_pass("lookup")], feeds=feeds(2), calibration=calibration,
                              options={"lookup": {"layers": "fc*", "v": 8}}, budget=Budget.parse(budget))
        record = result.records[0]
        return record, output_cosine(OrtRunner(result.model).run_all(holdout), original.run_all(holdout))

    everything, all_cosine = compile_with("cosine>=0.01")
    assert len(everything.rewrites) == 3 and all_cosine < 0.99
    assert everything.layers[0].data == "calibration (24 samples)"  # the last quarter held out
    bound = round((1 + all_cosine) / 2, 6)
    record, cosine = compile_with(f"cosine>={bound}")
    converted = [r.node for r in record.rewrites]
    refused = {s.node: s.reason for s in record.skipped if s.reason.startswith("kept in float")}
    assert 0 < len(converted) < 3 and len(converted) + len(refused) == 3 and cosine >= bound
    assert {layer.node for layer in record.layers} == set(converted)
    assert all("on the holdout (8 samples)" in reason for reason in refused.values())
