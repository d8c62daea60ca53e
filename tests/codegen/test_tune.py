"""`effc tune`: records per distinct matmul workload, resumable, and applied by compile_model."""

from __future__ import annotations

import json

import pytest

from effc.frontend.onnx import from_proto
from effc.verify import OrtRunner, deviation, make_inputs
from tests.codegen.blocks import transformer_block_proto

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
