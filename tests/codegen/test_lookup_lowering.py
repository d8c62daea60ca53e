"""effc.LookupLinear through codegen: the shuffle kernel (AVX-512, k = 16, int8 tables, M >= 16) or
the plain kernel (M < 16, other k, float tables, CPUs without AVX-512, the fallback), chosen per node
and recorded in the manifest; the compiled model equals ONNX Runtime running the op's function."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from effc.ops import DOMAIN, use
from effc.ops import lookup_linear as op
from effc.verify import OrtRunner, deviation

pytest.importorskip("tvm")
from tests.devices import requires_avx512, requires_nvcc  # noqa: E402  (imports TVM)

TOL = 1e-4  # scale-relative (verify.deviation): float summation order only, the codes are the same


def lookup_model(lead: list[int], layers: list[tuple], k_in: int = 32, seed: int = 0) -> ir.Model:
    """x [*lead, k_in] -> one LookupLinear per (encoder, v, k, n, table dtype, soft), chained."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", shape=ir.Shape([*lead, k_in]), type=ir.TensorType(ir.DataType.FLOAT))
    prev, width, nodes, inits = x, k_in, [], []
    for i, (encoder, v, k, n, dtype, soft) in enumerate(layers):
        chunks = width // v
        if encoder == "pq":
            const = rng.standard_normal((chunks, k, v)).astype(np.float32)
        else:
            const, k = (0.3 * rng.standard_normal((chunks, v))).astype(np.float32), 2 ** v
        if dtype == "int8":
            tables = rng.integers(-128, 128, size=(chunks, k, n)).astype(np.int8)
            scale = rng.uniform(0.01, 0.1, chunks).astype(np.float32)
        else:
            tables, scale = 0.1 * rng.standard_normal((chunks, k, n)).astype(np.float32), np.ones(chunks, np.float32)
        arrays = (const, tables, scale, rng.standard_normal(n).astype(np.float32))
        consts = [ir.Value(name=f"{name}{i}", shape=ir.Shape(a.shape),
                           type=ir.TensorType(ir.DataType.from_numpy(a.dtype)), const_value=ir.tensor(a, name=f"{name}{i}"))
                  for name, a in zip(("encoder_const", "tables", "table_scale", "bias"), arrays)]
        node = ir.Node(DOMAIN, op.NAME, [prev, *consts], num_outputs=1, name=f"lut{i}",
                       attributes=[ir.AttrString("encoder", encoder), ir.AttrInt64("v", v),
                                   ir.AttrInt64("soft", soft)])
        node.outputs[0].name, node.outputs[0].dtype = f"h{i}", ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape([*lead, n])
        nodes.append(node)
        inits += consts
        prev, width = node.outputs[0], n
    graph = ir.Graph([x], [prev], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="lookup")
    model = ir.Model(graph, ir_version=10)
    use(model, op.function(17))
    return model


def compile_and_compare(model, out, lead, k_in: int = 32, target="llvm") -> dict:
    """Compile ``model`` into ``out`` and check it against ONNX Runtime on two random feeds: the manifest."""
    from effc.codegen.build import compile_model, load_compiled

    result = compile_model(model, target, out)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((*lead, k_in)).astype(np.float32)} for _ in range(2)]
    compiled = load_compiled(out)
    assert deviation([compiled(f) for f in feeds], OrtRunner(model).run_all(feeds)).max_rel < TOL
    assert "matmul" not in result.rule_hits  # no dense product: every node is a kernel call
    return json.loads((out / "codegen.json").read_text())


def kernels_of(manifest: dict) -> list[str]:
    lowered = manifest["custom_ops"]
    assert all(c["lowering"] == "lookup" for c in lowered), lowered
    return [c["kernel"] for c in lowered]


PQ16 = ("pq", 4, 16, 48, "int8", 0)  # k = 16 int8: the shuffle kernel's layout
HASH16 = ("hash", 4, 16, 40, "int8", 0)
SOFT16 = ("hash", 4, 16, 36, "int8", 1)


@requires_avx512
@pytest.mark.parametrize("lead, layers, kernel", [
    ([2, 9], [PQ16, SOFT16], "lookup_shuffle"),  # batch 2, M = 18: X padded to 32 rows; N=36 ragged
    ([1, 3], [PQ16, SOFT16], "lookup_plain"),  # M = 3: below the shuffle's 16 rows
])
def test_llvm_uses_lookup_kernels_and_matches_ort(tmp_path, lead, layers, kernel):
    import tvm

    manifest = compile_and_compare(lookup_model(lead, layers), tmp_path, lead)
    assert all(name.startswith(kernel) for name in kernels_of(manifest)), manifest["custom_ops"]
    built = [name for name, rule in manifest["kernels"].items() if rule == "lookup"]
    assert len(built) == len(layers) and all(name.startswith(kernel) for name in built), manifest["kernels"]
    # Only the packed tables ship: int8, never a float weight of N x K
    params = tvm.runtime.load_param_dict_from_file(str(tmp_path / "params.bin")).values()
    assert sum(p.dtype == "int8" for p in params) == len(layers)
    assert not any(p.dtype == "float32" and np.prod(p.shape) >= 1024 for p in params)  # K x N >= 1152


@requires_avx512
def test_other_layouts_take_the_plain_kernel(tmp_path):
    """At M = 20 the shuffle kernel's rows are there, but k = 8 and float tables are not its layout."""
    layers = [("pq", 4, 8, 24, "int8", 0), ("pq", 3, 16, 18, "float32", 0), ("hash", 2, 4, 30, "float32", 1)]
    manifest = compile_and_compare(lookup_model([4, 5], layers), tmp_path, [4, 5])
    assert all(name.startswith("lookup_plain") for name in kernels_of(manifest)), manifest["custom_ops"]


def test_cpu_without_avx512_takes_the_plain_kernel(tmp_path):
    """Built for Haswell (AVX2, which this host runs): the same model takes the plain kernel."""
    from effc.codegen.target import BuildTarget, llvm_target

    spec = llvm_target(2, mcpu="haswell").spec
    target = BuildTarget("llvm", spec, 2)
    manifest = compile_and_compare(lookup_model([3, 7], [PQ16, SOFT16]), tmp_path, [3, 7], target=target)  # M=21
    assert all(name.startswith("lookup_plain") for name in kernels_of(manifest)), manifest["custom_ops"]


@requires_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_builds_lookup_kernels(tmp_path, arch):
    from effc.codegen.build import compile_model

    compile_model(lookup_model([2, 9], [PQ16, SOFT16]), "cuda", tmp_path, arch=arch)
    manifest = json.loads((tmp_path / "codegen.json").read_text())
    assert (tmp_path / "model.so").exists() and manifest["arch"] == arch
    assert all(name.startswith("lookup_cuda") for name in kernels_of(manifest)), manifest["custom_ops"]
    built = [name for name, rule in manifest["kernels"].items() if rule == "lookup"]
    assert len(built) == 2, manifest["kernels"]


@requires_avx512
def test_effc_compile_cli_lowers_lookup_nodes(tmp_path, monkeypatch, capsys):
    """`effc compile model.onnx --target llvm`: both nodes on the lookup kernels, said on the terminal and
    in the manifest, and the CLI's own check against ONNX Runtime passes (exit 0)."""
    import sys

    from effc.cli import main
    from effc.ir import save

    save(lookup_model([2, 9], [PQ16, HASH16]), tmp_path / "lut.onnx")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["effc", "compile", str(tmp_path / "lut.onnx"), "-o", str(out),
                                      "--passes", "none", "--target", "llvm"])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    output = "".join(capsys.readouterr())
    assert code == 0, output
    assert "LookupLinear: 2 of 2 on the lookup kernels" in output, output
    manifest = json.loads((out / "codegen.json").read_text())
    assert all(name.startswith("lookup_shuffle_m32") for name in kernels_of(manifest)), manifest["custom_ops"]


@requires_avx512
def test_lookup_pass_output_compiles_to_the_kernels(tmp_path):
    """What the lookup pass writes (an mlp's three linears, x [1, 16, 32]: M = 16) lowers to the kernels."""
    from effc.frontend.onnx import from_proto
    from effc.passes import get_pass
    from effc.pipeline import run_pipeline
    from tests.passes.shift_add_models import feeds, mlp

    result = run_pipeline(from_proto(mlp()), [get_pass("lookup")], feeds=feeds(2, seed=99),
                          options={"lookup": {"layers": "fc*", "v": 8}}, calibration=feeds(16))
    manifest = compile_and_compare(result.model, tmp_path, [1, 16])
    names = kernels_of(manifest)
    assert len(names) == 3 and all(name.startswith("lookup_shuffle") for name in names), manifest["custom_ops"]
