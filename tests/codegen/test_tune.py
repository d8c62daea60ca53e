"""`effc tune`: records per distinct matmul workload, resumable, and applied by compile_model."""

from __future__ import annotations

import json

import numpy as np

import pytest

from effc.frontend.onnx import from_proto
from effc.verify import OrtRunner, deviation, make_inputs
from tests.codegen.blocks import transformer_block_proto
from tests.helpers import effc

pytest.importorskip("tvm")


def test_tune_records_resume_and_apply(tmp_path):
    import tvm

    from effc.codegen.build import compile_model, run_compiled
    from effc.codegen.tune import tune_model

    model = from_proto(transformer_block_proto())
    path = tmp_path / "records.json"
    first = tune_model(model, 2, path, progress=lambda _: None, repeat=1)
    records = json.loads(path.read_text())["records"]
    assert first.workloads >= 4 and first.tuned == first.workloads == len(records)
    assert all(r["rule"] == "matmul" and r["ms"] > 0 and set(r["knobs"]) == {"mr", "nr_vectors"}
               for r in records.values())
    assert tune_model(model, 2, path, progress=lambda _: None).tuned == 0  # resumed: nothing left

    # A record's knobs replace the defaults: one-vector (16-wide) panels instead of 32-wide ones.
    for record in records.values():
        record["knobs"] = {"mr": 4, "nr_vectors": 1}
    path.write_text(json.dumps({"format": "effc-records-1", "records": records}))
    out = tmp_path / "out"
    compile_model(model, "llvm", out, records=path)
    assert json.loads((out / "codegen.json").read_text())["tuned_kernels"] == len(records)
    shapes = [tuple(p.shape) for p in tvm.runtime.load_param_dict_from_file(str(out / "params.bin")).values()]
    assert (8, 64, 16) in shapes and (4, 64, 32) not in shapes, shapes
    feeds = make_inputs(model, 2, seed=5)
    assert deviation(run_compiled(out, feeds), OrtRunner(model).run_all(feeds)).max_rel < 1e-4


def linear_then_batchnorm(path) -> None:
    """x [16, 32] -> MatMul -> BatchNormalization: fold-batchnorm (a default pass) turns the kernel's
    normalising epilogue into a bias add, a different workload."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W", (32, 64)), ("gamma", (64,)), ("beta", (64,)), ("mean", (64,)))]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, 64).astype(np.float32), "var"))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, path)


@pytest.mark.parametrize("passes, tuned", [(None, 1), ("none", 0)])
def test_cli_tune_builds_what_compile_builds(tmp_path, passes, tuned):
    """`effc tune` runs compile's default passes first, so its records fit the kernels `effc compile`
    builds; with --passes none they fit the unfolded model and the compiled kernel goes untuned."""
    model = tmp_path / "linear_bn.onnx"
    linear_then_batchnorm(model)
    records = tmp_path / "records.json"
    tune = ["tune", model, "--trials", "1", "--records", records] + (["--passes", passes] if passes else [])
    proc = effc(*tune)
    assert proc.returncode == 0, proc.stderr
    proc = effc("compile", model, "-o", tmp_path / "out", "--target", "llvm", "--records", records)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "codegen.json").read_text())
    assert manifest["rule_hits"].get("matmul") == 1 and manifest["tuned_kernels"] == tuned, manifest


def test_cli_tune_refuses_passes_for_a_compiled_output(tmp_path):
    (tmp_path / "out").mkdir()
    proc = effc("tune", tmp_path / "out", "--records", tmp_path / "r.json", "--passes", "none")
    assert proc.returncode == 2 and "already through its passes" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tune_searches_the_int8_rule_of_a_qdq_model(tmp_path, monkeypatch):
    """A QDQ model's integer matmuls are tuned with the int8 rule's knobs, and the build applies them
    (its result still agrees with ONNX Runtime on the QDQ model within one quantisation step). On
    VNNI tiles: an AMX host's fixed tiles take no knobs (EFFC_AMX=0 builds VNNI tiles there)."""
    monkeypatch.setenv("EFFC_AMX", "0")
    import onnx
    import onnx_ir as ir

    from effc.codegen.build import compile_model
    from effc.codegen.runtime import load_compiled
    from effc.codegen.tune import tune_model
    from tests.codegen.qdq_models import calibration, float_mlp, quantize_qdq
    from tests.codegen.test_int8_qdq import host_has_vnni, ort_run, step_of

    if not host_has_vnni():
        pytest.skip("this CPU lacks AVX-512 VNNI: no int8 kernels to tune")
    shape = [2, 5, 37]
    path = quantize_qdq(float_mlp(2, (5,), 37, 50), tmp_path / "q.onnx", calibration(shape))
    model = ir.from_proto(onnx.load(str(path)))
    records_path = tmp_path / "records.json"
    result = tune_model(model, 3, records_path, progress=lambda _: None, repeat=1)
    records = json.loads(records_path.read_text())["records"]
    assert result.workloads == 2 and sorted(r["rule"] for r in records.values()) == ["int8-matmul"] * 2
    for record in records.values():  # a non-default tile, so the test sees the records applied
        record["knobs"] = {"mr": 4, "nr_vectors": 1}
    records_path.write_text(json.dumps({"format": "effc-records-1", "records": records}))
    out = tmp_path / "out"
    compile_model(model, "llvm", out, records=records_path)
    manifest = json.loads((out / "codegen.json").read_text())
    assert manifest["tuned_kernels"] == 2 and manifest["rule_hits"].get("int8-matmul") == 2, manifest
    feed = {"x": calibration(shape, 1, seed=9)[0]}
    got = next(iter(load_compiled(out)(feed).values()))
    assert float(np.abs(got - ort_run(path, feed)).max()) <= step_of(path, "m2_scale")
