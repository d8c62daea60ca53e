"""The small zoo models build for CUDA sm_90 without a GPU (nvcc only), every kernel scheduled by a
GPU rule; on a machine with a GPU, built for its arch, they also run and agree with ONNX Runtime.
The large models (minutes each) are built by tools/build_zoo_cuda.py."""

from __future__ import annotations

import json

import pytest

from effc.frontend.onnx import load
from effc.verify import OrtRunner, deviation

pytest.importorskip("tvm")
from tests.devices import gpu_arch, requires_gpu, requires_nvcc  # noqa: E402  (imports TVM)

SMALL = ("vit-digits", "gpt-text", "llama-tiny", "deit-tiny-repbn", "minilm-l6")


@requires_nvcc
@pytest.mark.parametrize("name", SMALL)
def test_zoo_model_builds_for_sm90(name, tmp_path):
    from effc.codegen.build import compile_model
    from effc.zoo.cache import cached_model_path

    path = cached_model_path(name)
    compile_model(load(path), "cuda", tmp_path, arch="sm_90", source=f"zoo:{name}")
    manifest = json.loads((tmp_path / "codegen.json").read_text())
    assert manifest["target"] == "cuda" and manifest["arch"] == "sm_90" and manifest["source"] == f"zoo:{name}"
    assert manifest["kernels"] and "unscheduled" not in manifest["kernels"].values(), manifest["rule_hits"]
    assert not manifest["rule_errors"], manifest["rule_errors"]
    assert b"_kernel" in (tmp_path / "model.so").read_bytes()  # device code is embedded


@requires_nvcc
@requires_gpu
@pytest.mark.parametrize("name", SMALL)
def test_zoo_model_on_the_gpu_matches_ort(name, tmp_path):
    from effc import zoo
    from effc.codegen.build import compile_model, run_compiled
    from effc.zoo.cache import cached_model_path

    path = cached_model_path(name)
    compile_model(load(path), "cuda", tmp_path, arch=gpu_arch(), source=f"zoo:{name}")
    feeds = zoo.get(name).sample_inputs(2, 0)
    assert deviation(run_compiled(tmp_path, feeds), OrtRunner(path).run_all(feeds)).max_rel < 1e-4
