"""`effc bench --vs ort,torch`: every engine timed in one interleaved run, the JSON keys of the issue,
torch found through the zoo name the build recorded; torch refused for a model that is not a zoo one."""

from __future__ import annotations

import pytest

from effc.errors import EffcError
from effc.frontend.onnx import from_proto, load
from effc.ir import save
from tests.helpers import tiny_mlp_proto

pytest.importorskip("tvm")


def test_bench_against_ort_and_torch(tmp_path):
    from effc.codegen.bench import BURST, bench
    from effc.codegen.build import compile_model
    from effc.zoo.cache import cached_model_path

    model = load(cached_model_path("vit-digits"))
    save(model, tmp_path / "model.onnx")  # as `effc compile` writes it (no passes here)
    compile_model(model, "llvm", tmp_path, source="zoo:vit-digits")
    result = bench(tmp_path, ("ort", "torch"), warmup=1, runs=2, settle_s=0.001)
    for engine in ("effc", "ort", "torch"):
        stats = result[engine]
        assert 0 < stats["median_ms"] <= stats["p90_ms"] and stats["runs"] == 2 * BURST  # back-to-back calls
        assert 0 < stats["after_idle_median_ms"] <= stats["after_idle_p90_ms"]  # each turn's first call
    assert result["ratio_vs_ort"] > 0 and result["ratio_vs_ort_after_idle"] > 0 and result["ratio_vs_torch"] > 0
    assert result["max_rel_err"] < 1e-4 and result["torch_max_rel_err"] < 1e-4
    assert result["method"]["ort_config"] == {"session.force_spinning_stop": "1"}


def test_torch_needs_a_zoo_model(tmp_path):
    from effc.codegen.bench import bench
    from effc.codegen.build import compile_model

    compile_model(from_proto(tiny_mlp_proto()), "llvm", tmp_path)
    with pytest.raises(EffcError, match="--vs torch needs a model compiled from zoo:NAME"):
        bench(tmp_path, ("torch",), warmup=0, runs=1)
