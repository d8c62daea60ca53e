"""Codegen: tiny models compiled with TVM agree with ONNX Runtime; CUDA builds without a GPU; CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from effc.errors import EffcError
from effc.frontend.onnx import from_proto
from effc.verify import OrtRunner, deviation, make_inputs
from tests.codegen.blocks import transformer_block_proto
from tests.helpers import effc, tiny_mlp_proto

pytest.importorskip("tvm")
from tests.devices import gpu_arch, gpu_present, requires_gpu, requires_nvcc  # noqa: E402  (imports TVM)

TOL = 1e-4  # scale-relative, as verify.deviation measures it


@pytest.fixture(scope="module")
def block_model():
    return from_proto(transformer_block_proto())


@pytest.fixture(scope="module")
def block_llvm(block_model, tmp_path_factory):
    from effc.codegen.build import compile_model

    out = tmp_path_factory.mktemp("block_llvm")
    return out, compile_model(block_model, "llvm", out)


def test_block_llvm_matches_ort(block_model, block_llvm):
    from effc.codegen.build import load_compiled

    out, result = block_llvm
    feeds = make_inputs(block_model, 3, seed=1)
    got = [load_compiled(out)(f) for f in feeds]
    dev = deviation(got, OrtRunner(block_model).run_all(feeds))
    assert dev.max_rel < TOL, dev
    # Every dense projection went through the matmul rule, the head transposes through elementwise;
    # nothing is left to the fallback.
    assert result.rule_hits.get("matmul", 0) >= 4, result.rule_hits
    assert result.rule_hits.get("elementwise", 0) >= 1, result.rule_hits
    assert "fallback" not in result.rule_hits and "unscheduled" not in result.rule_hits, result.rule_hits


def test_weights_are_prepacked(block_llvm):
    import tvm

    out, _ = block_llvm
    params = tvm.runtime.load_param_dict_from_file(str(out / "params.bin"))
    shapes = [tuple(p.shape) for p in params.values()]
    # [n / nr, k, nr] panels: a 64x128 weight packed with nr=32 becomes (4, 64, 32).
    assert (4, 64, 32) in shapes, shapes
    assert (64, 128) not in shapes, "the unpacked weight should not be shipped"


def test_plain_tvm_loads_the_output(block_model, block_llvm):
    """OUT needs nothing from effc: load_module + VirtualMachine + the params file."""
    import tvm
    from tvm import relax

    out, _ = block_llvm
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    params = tvm.runtime.load_param_dict_from_file(str(out / "params.bin"))
    feed = make_inputs(block_model, 1, seed=2)[0]
    y = vm["main"](tvm.runtime.tensor(feed["x"]), *[params[k] for k in sorted(params)]).numpy()
    assert deviation([{"y": y}], [OrtRunner(block_model)(feed)]).max_rel < TOL


def test_tiny_mlp_llvm_matches_ort(tmp_path):
    from effc.codegen.build import compile_model, run_compiled

    model = from_proto(tiny_mlp_proto())
    compile_model(model, "llvm", tmp_path)
    assert {"model.so", "params.bin", "codegen.json"} <= {p.name for p in tmp_path.iterdir()}
    feeds = make_inputs(model, 2)
    assert deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds)).max_rel < TOL


def test_patch_conv_matches_ort(tmp_path):
    """A ViT patch-embedding Conv fits the matmul rule's S/I/J/K pattern but must not be taken by
    it as a conv (its im2col normalisation read garbage); regression for vit-s16's wrong outputs.
    (It is now rewritten into a matmul first: effc/codegen/patchify.py.)"""
    from onnx import TensorProto, helper, numpy_helper

    from effc.codegen.build import compile_model, run_compiled

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], strides=[16, 16], kernel_shape=[16, 16])],
                              "patch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 3, 3])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = from_proto(proto)
    compile_model(model, "llvm", tmp_path)
    feeds = make_inputs(model, 1)
    assert deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds)).max_rel < TOL


def test_custom_domain_op_is_refused_by_name():
    from effc.codegen.relax_import import import_model

    proto = tiny_mlp_proto()
    proto.graph.node[2].op_type, proto.graph.node[2].domain = "ShiftAdd", "effc"
    proto.opset_import.append(onnx.helper.make_opsetid("effc", 1))
    import onnx_ir as ir

    with pytest.raises(EffcError, match="effc.ShiftAdd"):
        import_model(ir.serde.deserialize_model(proto))


def test_symbolic_input_shape_is_refused():
    from effc.codegen.relax_import import import_model

    proto = tiny_mlp_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(EffcError, match="symbolic shape"):
        import_model(from_proto(proto))


@pytest.fixture(scope="module")
def block_cuda_sm90(block_model, tmp_path_factory):
    from effc.codegen.build import compile_model

    out = tmp_path_factory.mktemp("block_cuda")
    return out, compile_model(block_model, "cuda", out, arch="sm_90")


@requires_nvcc
def test_block_cuda_sm90_builds(block_cuda_sm90):
    out, result = block_cuda_sm90
    manifest = json.loads((out / "codegen.json").read_text())
    assert manifest["target"] == "cuda" and manifest["arch"] == "sm_90"
    assert result.rule_hits.get("Matmul", 0) >= 1, result.rule_hits  # dlight's GPU matmul rule
    assert b"_kernel" in (out / "model.so").read_bytes()  # device kernels are embedded


@requires_nvcc
@pytest.mark.skipif(gpu_present(), reason="a GPU is present: the module loads (see the on-GPU test)")
def test_cuda_module_without_a_gpu_is_a_one_line_error(block_cuda_sm90):
    from effc.codegen.build import load_compiled

    with pytest.raises(EffcError, match="no GPU"):
        load_compiled(block_cuda_sm90[0])


@requires_nvcc
@requires_gpu
def test_block_cuda_matches_ort_on_the_gpu(block_model, tmp_path):
    from effc.codegen.build import compile_model, run_compiled

    compile_model(block_model, "cuda", tmp_path, arch=gpu_arch())
    feeds = make_inputs(block_model, 2, seed=0)
    assert deviation(run_compiled(tmp_path, feeds), OrtRunner(block_model).run_all(feeds)).max_rel < TOL


def test_unknown_arch_is_refused():
    from effc.codegen.target import make_target

    with pytest.raises(EffcError, match="unknown CUDA arch"):
        make_target("cuda", "sm_12")
    with pytest.raises(EffcError, match="--arch applies"):
        make_target("llvm", "sm_90")


def test_cli_compile_run_bench_round_trip(tmp_path):
    model_path = tmp_path / "block.onnx"
    onnx.save(transformer_block_proto(), model_path)
    out = tmp_path / "out"
    proc = effc("compile", model_path, "-o", out, "--target", "llvm")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.so").exists() and (out / "model.onnx").exists()

    model = from_proto(transformer_block_proto())
    feeds = make_inputs(model, 3, seed=3)
    np.savez(tmp_path / "x.npz", x=np.concatenate([f["x"] for f in feeds]))  # 3 samples on axis 0
    proc = effc("run", out, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npz")["y"]
    ref = np.concatenate([r["y"] for r in OrtRunner(model).run_all(feeds)])
    assert y.shape == ref.shape == (3, 16, 64)
    assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < TOL

    proc = effc("bench", out, "--vs", "ort", "--runs", "2", "--warmup", "1", "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    for engine in ("effc", "ort"):
        assert report[engine]["median_ms"] > 0 and report[engine]["p90_ms"] >= report[engine]["median_ms"]
    assert report["ratio_vs_ort"] > 0 and report["max_rel_err"] < TOL

    np.savez(tmp_path / "bad.npz", x=np.zeros((1, 7, 64), np.float32))
    proc = effc("run", out, "--inputs", tmp_path / "bad.npz", "-o", tmp_path / "z.npz")
    assert proc.returncode == 2 and "compiled for [1, 16, 64]" in proc.stderr, proc.stderr


def test_cli_arch_without_cuda_exits_2(tmp_path):
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp_proto(), model_path)
    proc = effc("compile", model_path, "-o", tmp_path / "out", "--target", "llvm", "--arch", "sm_90")
    assert proc.returncode == 2 and "--arch applies" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
