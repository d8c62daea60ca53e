"""effc.ShiftAddMatMul through codegen: LUT kernels on llvm (decode and prefill) and on CUDA, dense
fallback for shapes the kernels do not tile; results equal ONNX Runtime running the function form."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from effc.errors import EffcError
from effc.ops import DOMAIN, use
from effc.ops import shift_add_matmul as op
from effc.verify import OrtRunner, deviation

pytest.importorskip("tvm")
from tests.devices import gpu_arch, requires_avx512, requires_gpu, requires_nvcc  # noqa: E402  (imports TVM)

TOL = 1e-4  # scale-relative (verify.deviation)
K = 64


def shift_add_model(lead: list[int], widths=(128, 64), seed: int = 0, x_k: int = K) -> ir.Model:
    """x [*lead, K] -> ShiftAddMatMul (3 planes, group 8, one term) per width, chained."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", shape=ir.Shape([*lead, x_k]), type=ir.TensorType(ir.DataType.FLOAT))
    prev, k, nodes, inits = x, K, [], []
    for i, n in enumerate(widths):
        planes = op.pack_planes(rng.choice([-1, 1], size=(3, n, k)))
        signs = rng.choice([-1, 0, 1], size=(3, n, k // 8, 1), p=[0.45, 0.1, 0.45])
        codes = op.encode_terms(signs, rng.integers(-8, 0, size=signs.shape))
        bias = rng.standard_normal(n).astype(np.float32)
        consts = [ir.Value(name=f"{name}{i}", shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                           const_value=ir.tensor(a, name=f"{name}{i}"))
                  for name, a in (("planes", planes), ("codes", codes), ("bias", bias))]
        node = ir.Node(DOMAIN, op.NAME, [prev, *consts], num_outputs=1, name=f"fc{i}")
        node.outputs[0].name, node.outputs[0].dtype = f"h{i}", ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape([*lead, n])
        nodes.append(node)
        inits += consts
        prev, k = node.outputs[0], n
    graph = ir.Graph([x], [prev], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="shift_add")
    model = ir.Model(graph, ir_version=10)
    use(model, op.function(17))
    return model


def compiled_deviation(model, out, lead) -> float:
    from effc.codegen.build import load_compiled

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((*lead, K)).astype(np.float32)} for _ in range(2)]
    compiled = load_compiled(out)
    return deviation([compiled(f) for f in feeds], OrtRunner(model).run_all(feeds)).max_rel


@requires_avx512
@pytest.mark.parametrize("lead, kernel", [([1, 1], "shift_add_lut"), ([1, 32], "shift_add_prefill"),
                                          ([2, 10], "shift_add_prefill")])  # M=20: X padded to 32 rows
def test_llvm_uses_lut_kernels_and_matches_ort(tmp_path, lead, kernel):
    import tvm

    from effc.codegen.build import compile_model

    model = shift_add_model(lead)
    result = compile_model(model, "llvm", tmp_path)
    assert compiled_deviation(model, tmp_path, lead) < TOL
    manifest = json.loads((tmp_path / "codegen.json").read_text())
    lowered = manifest["custom_ops"]
    assert [c["lowering"] for c in lowered] == ["shift-add-lut"] * 2, lowered
    assert all(c["kernel"].startswith(kernel) for c in lowered), lowered
    luts = [name for name, rule in manifest["kernels"].items() if rule == "shift-add-lut"]
    assert len(luts) == 2 and all(name.startswith(kernel) for name in luts), manifest["kernels"]
    assert "matmul" not in result.rule_hits  # no dense product anywhere
    # Only packed weights ship: no float weight of N*K elements is rebuilt or stored.
    params = tvm.runtime.load_param_dict_from_file(str(tmp_path / "params.bin")).values()
    packed = ("uint8", "uint32")  # bit planes and exponent fields (the decode kernel packs them in words)
    assert sum(p.dtype in packed for p in params) == 4
    assert all(p.dtype in packed or len(p.shape) == 1 for p in params)


@requires_avx512
def test_profile_labels_lut_kernels(tmp_path):
    from effc.codegen.build import compile_model, load_compiled
    from effc.codegen.profile import profile

    compile_model(shift_add_model([1, 1]), "llvm", tmp_path)
    rows, _ = profile(load_compiled(tmp_path), {"x": np.ones((1, 1, K), np.float32)}, runs=1)
    assert sum(r.rule == "shift-add-lut" for r in rows) == 2, [(r.name, r.rule) for r in rows]


@requires_avx512
def test_untileable_node_falls_back_to_dense(tmp_path):
    from effc.codegen.build import compile_model

    model = shift_add_model([1, 4], widths=(40, 64))  # N=40: not whole 64-row blocks; K=40 tiles
    result = compile_model(model, "llvm", tmp_path)
    assert compiled_deviation(model, tmp_path, [1, 4]) < TOL
    lowered = {c["node"]: c for c in result.custom_ops}
    assert lowered["fc0"]["lowering"] == "dense" and "N=40" in lowered["fc0"]["reason"]
    assert lowered["fc1"]["lowering"] == "shift-add-lut"
    assert "dense fallback" in result.custom_summary


@requires_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_builds_lut_kernels(tmp_path, arch):
    from effc.codegen.build import compile_model

    model = shift_add_model([1, 32])
    compile_model(model, "cuda", tmp_path, arch=arch)
    manifest = json.loads((tmp_path / "codegen.json").read_text())
    assert (tmp_path / "model.so").exists() and manifest["arch"] == arch
    lowered = manifest["custom_ops"]
    assert [c["lowering"] for c in lowered] == ["shift-add-lut"] * 2, lowered
    assert all(c["kernel"].startswith("shift_add_lut_cuda") for c in lowered), lowered
    luts = [name for name, rule in manifest["kernels"].items() if rule == "shift-add-lut"]
    assert len(luts) == 2 and all(name.startswith("shift_add_lut_cuda") for name in luts), manifest["kernels"]


@requires_nvcc
@requires_gpu
def test_cuda_lut_kernels_match_ort_on_the_gpu(tmp_path):
    from effc.codegen.build import compile_model

    model = shift_add_model([1, 32])
    compile_model(model, "cuda", tmp_path, arch=gpu_arch())
    manifest = json.loads((tmp_path / "codegen.json").read_text())
    assert [c["lowering"] for c in manifest["custom_ops"]] == ["shift-add-lut"] * 2
    assert compiled_deviation(model, tmp_path, [1, 32]) < TOL


def test_malformed_node_is_a_one_line_error(tmp_path):
    from effc.codegen.build import compile_model

    with pytest.raises(EffcError, match="X has K=48") as info:
        compile_model(shift_add_model([1, 1], x_k=48), "llvm", tmp_path)
    assert "\n" not in str(info.value)


@requires_avx512  # the packed parameters below are the CPU kernels'
def test_importer_converter_map_is_restored(monkeypatch):
    from tvm.relax.frontend.onnx import onnx_frontend

    from effc.codegen import custom_ops
    from effc.codegen.relax_import import import_model

    imported = import_model(shift_add_model([1, 1]))
    assert len(imported.mod["main"].params) == 1 + 2 + 4  # x, biases, packed bits and exps per node
    assert custom_ops.PRIVATE_OP not in onnx_frontend._get_convert_map()

    def broken(self, bb, inputs, attr):
        raise RuntimeError("converter failed")

    monkeypatch.setattr(custom_ops.CustomOpLowering, "_convert", broken)
    with pytest.raises(EffcError, match="converter failed"):
        import_model(shift_add_model([1, 1]))
    assert custom_ops.PRIVATE_OP not in onnx_frontend._get_convert_map()
