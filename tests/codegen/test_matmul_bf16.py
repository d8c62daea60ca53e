"""--precision bf16 on CPU: every float matmul (linears with their fused epilogues, attention's two
computed operands) runs on the matmul-bf16 rule (vdpbf16ps), close to fp32 ONNX Runtime at a bf16
tolerance; weights ship as pre-packed bf16 pairs; a CPU without AVX-512 BF16 gets fp32, never a
crash; a wrong bf16 tile fails the compile (exit 1)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes

pytest.importorskip("tvm")


def _host_has_avx512_bf16() -> bool:
    from effc.codegen.precision import cpu_features
    from effc.codegen.target import make_target

    return "avx512bf16" in cpu_features(make_target("llvm").tvm())


requires_bf16 = pytest.mark.skipif(not _host_has_avx512_bf16(), reason="this CPU lacks AVX-512 BF16 (vdpbf16ps)")

M, K, H, N2, HEADS = 37, 33, 40, 17, 3  # odd rows, K neither a multiple of 2 nor of 32


def mixed_model():
    """Every bf16 path in one graph: batch 2, x[2, 37, 33] @ W1 + b1 -> erf GELU (rank 3, bias, GELU);
    @ W2 + x, * 0.5 (residual add, scale); 3 heads of 11: softmax(q k^T) v (rank 4, both operands
    computed, k = 11 odd, then k = 37); z[5, 33] @ W3 (rank 2, n = 17 ragged)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    w = lambda name, *shape: const(name, rng.standard_normal(shape) / np.sqrt(shape[0]))  # noqa: E731
    hd = K // HEADS
    h = node("Add", [node("MatMul", ["x", w("W1", K, H)], "mm1"), const("b1", rng.standard_normal(H))], "h")
    gelu = node("Mul", [node("Mul", [h, const("half", 0.5)], "hh"),
                        node("Add", [node("Erf", [node("Div", [h, const("sqrt2", np.sqrt(2))], "hs")], "erf"),
                                     const("one", 1.0)], "e1")], "gelu")
    r = node("Mul", [node("Add", [node("MatMul", [gelu, w("W2", H, K)], "mm2"), "x"], "res"), "half"], "r")
    heads = node("Transpose", [node("Reshape", [r, node("Constant", [], "shape", value=numpy_helper.from_array(
        np.array([2, M, HEADS, hd], np.int64)))], "split")], "heads", perm=[0, 2, 1, 3])
    kt = node("Transpose", [heads], "kt", perm=[0, 1, 3, 2])
    att = node("Softmax", [node("MatMul", [heads, kt], "qk")], "att", axis=-1)
    node("MatMul", [att, heads], "y")
    node("MatMul", ["z", w("W3", K, N2)], "y2")
    return model_from_nodes(nodes, [("x", [2, M, K]), ("z", [5, K])],
                            [("y", [2, HEADS, M, hd]), ("y2", [5, N2])], inits)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from effc.codegen.build import compile_model

    out = tmp_path_factory.mktemp("bf16")
    model = mixed_model()
    return model, out, compile_model(model, "llvm", out, precision="bf16")


@requires_bf16
def test_every_matmul_runs_bf16_close_to_fp32_ort(built):
    from effc.codegen.build import run_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    model, out, result = built
    assert result.precision == "bf16" and "avx512bf16" in result.precision_reason, result.precision_reason
    matmuls = {name: rule for name, rule in result.kernels.items() if "matmul" in name}
    assert len(matmuls) == 5 and set(matmuls.values()) == {"matmul-bf16"}, result.kernels
    # the heads' cast to bf16 moved ahead of their reshape and transposes, into the matmul making them
    assert not any("transpose" in name and "cast" in name for name in result.kernels), result.kernels
    softmax = [rule for name, rule in result.kernels.items() if "softmax" in name]
    assert softmax == ["softmax"], result.kernels  # its cast to bf16 fused into the softmax kernel
    feeds = make_inputs(model, 2, seed=4)
    dev = deviation(run_compiled(out, feeds), OrtRunner(model).run_all(feeds))
    assert dev.cosine >= 0.999 and dev.max_rel < 2e-2, dev
    assert dev.max_rel > 1e-5, f"{dev}: no bf16 rounding at all, so the matmuls did not run in bf16"


@requires_bf16
def test_weights_ship_as_prepacked_bf16_pairs(built):
    import tvm

    _, out, _ = built
    params = {tuple(p.shape): str(p.dtype) for p in tvm.runtime.load_param_dict_from_file(
        str(out / "params.bin")).values()}
    panels = [s for s, d in params.items() if d == "bfloat16" and len(s) == 4 and s[-1] == 2]
    assert len(panels) == 3, params  # W1, W2, W3 as [n / nr, k / 2, nr, 2]
    assert all(s[1] == (K + 1) // 2 or s[1] == H // 2 for s in panels), panels
    assert not any(s in params for s in [(K, H), (H, K), (K, N2)]), "an unpacked weight was shipped"


@requires_bf16
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_model_so_computes_with_vdpbf16ps(built):
    _, out, _ = built
    asm = subprocess.run(["objdump", "-d", str(out / "model.so")], capture_output=True, text=True).stdout
    assert "vdpbf16ps" in asm
    assert "tdpbf16ps" in asm  # the AMX path is in every bf16 model.so: the CPU that runs it picks


@requires_bf16
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_q_kt_reads_k_rows(tmp_path):
    """Q.K^T with K^T a transpose of K's heads: the product reads K's rows (effc.codegen.product_nt),
    no K^T kernel, the C tile packs the panel from them; agrees with fp32 ONNX Runtime."""
    from effc.codegen.build import compile_model, run_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    rng = np.random.default_rng(3)
    heads, d, s = 2, 24, 21  # 12 values a head: k even; 21 tokens: a ragged panel
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) / 5).astype(np.float32), w) for w in ("Wq", "Wk")]
    inits.append(numpy_helper.from_array(np.array([1, s, heads, d // heads], np.int64), "shape"))
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q0"]), helper.make_node("MatMul", ["x", "Wk"], ["k0"]),
             helper.make_node("Reshape", ["q0", "shape"], ["q1"]), helper.make_node("Reshape", ["k0", "shape"], ["k1"]),
             helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["y"])]
    model = model_from_nodes(nodes, [("x", [1, s, d])], [("y", [1, heads, s, s])], inits)
    result = compile_model(model, "llvm", tmp_path, precision="bf16")
    asm = subprocess.run(["objdump", "-d", str(tmp_path / "model.so")], capture_output=True, text=True).stdout
    assert re.search(r"call.*<effc_bf16_tile_rows>", asm), "q k^T did not read k as rows"
    feeds = make_inputs(model, 1, seed=2)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.cosine >= 0.999 and dev.max_rel < 2e-2, dev


def _run_in_child(out, feeds, amx: str):
    """The compiled module's outputs from a fresh process with EFFC_AMX=``amx`` (the tile path is
    chosen once per process)."""
    import os
    import sys

    np.savez(out / f"feeds{amx}.npz", **feeds)
    code = ("import sys, numpy as np; from effc.codegen.build import run_compiled; "
            "f = dict(np.load(sys.argv[2])); r = run_compiled(sys.argv[1], [f])[0]; "
            "np.savez(sys.argv[3], **r)")
    result = out / f"out{amx}.npz"
    subprocess.run([sys.executable, "-c", code, str(out), str(out / f"feeds{amx}.npz"), str(result)], check=True,
                   env={**os.environ, "EFFC_AMX": amx})
    return dict(np.load(result))


@requires_bf16
def test_amx_and_vector_paths_agree_in_a_compiled_module(built):
    """A module built on an AMX host runs on a CPU (or OS) without tile state: the same tiles then
    run on vdpbf16ps, rows split to what the registers hold, with the same results up to fp32
    summation order."""
    from effc.verify import make_inputs

    model, out, _ = built
    feeds = make_inputs(model, 1, seed=7)[0]
    vector, amx = _run_in_child(out, feeds, "0"), _run_in_child(out, feeds, "1")
    for name in vector:
        scale = np.abs(vector[name]).max()
        assert np.abs(vector[name] - amx[name]).max() <= 1e-4 * scale, name


def test_a_cpu_without_avx512_bf16_gets_fp32(tmp_path):
    """skylake-avx512 has AVX-512 but no BF16: bf16 and auto both build fp32 (and say why), runnable here."""
    from effc.codegen.build import compile_model, run_compiled
    from effc.codegen.precision import choose
    from effc.codegen.target import llvm_target
    from effc.verify import OrtRunner, deviation, make_inputs

    bt = llvm_target(2, mcpu="skylake-avx512")  # a named CPU: none of the host's features added
    for requested in ("bf16", "auto"):
        taken, why = choose(requested, bt.tvm())
        assert taken == "fp32" and "skylake-avx512 has no avx512bf16" in why, why
    model = model_from_nodes([helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", [2, 9, K]), ("b", [2, K, 5])],
                             [("y", [2, 9, 5])])
    result = compile_model(model, bt, tmp_path, precision="bf16")
    assert result.precision == "fp32" and "matmul-bf16" not in result.kernels.values(), result.kernels
    feeds = make_inputs(model, 1, seed=1)
    assert deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds)).max_rel < 1e-4


@requires_bf16
def test_a_wrong_bf16_tile_fails_the_compile(tmp_path, monkeypatch, capsys):
    """The tile reads B one column off (a legal, wrong kernel): compile exits 1 naming the kernel."""
    import effc.codegen.bf16_tile_call as tile_call
    from effc.cli import run

    real = tile_call.element_address
    monkeypatch.setattr(tile_call, "element_address", lambda region, row=0, column=0: real(
        region, row, column + (1 if len(region.region) == 4 and not row else 0)))
    path = tmp_path / "model.onnx"
    onnx.save(onnx.load_from_string(_proto_bytes()), path)
    code = run(["compile", str(path), "-o", str(tmp_path / "out"), "--target", "llvm", "--passes", "none",
                "--precision", "bf16"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "disagrees with ONNX Runtime" in err and "bf16 allows" in err and "(rule matmul-bf16" in err, err


def test_precision_needs_an_llvm_target(tmp_path, capsys):
    from effc.cli import run

    path = tmp_path / "model.onnx"
    onnx.save(onnx.load_from_string(_proto_bytes()), path)
    code = run(["compile", str(path), "-o", str(tmp_path / "out"), "--passes", "none", "--precision", "bf16"])
    assert code == 2 and "--target llvm only" in capsys.readouterr().err


def _proto_bytes() -> bytes:
    from effc.ir import to_proto

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((K, 48)).astype(np.float32), "W")]
    model = model_from_nodes([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", [2, 7, K])], [("y", [2, 7, 48])],
                             inits)
    return to_proto(model).SerializeToString()


@requires_bf16
def test_tune_with_bf16_records_the_bf16_rule(tmp_path, monkeypatch):
    """vdpbf16ps tiles (EFFC_AMX=0 builds them on an AMX host, whose own tiles take no knobs)."""
    import json

    from effc.codegen.tune import tune_model

    monkeypatch.setenv("EFFC_AMX", "0")
    rng = np.random.default_rng(3)
    model = model_from_nodes([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", [1, 16, K])], [("y", [1, 16, 64])],
                             [numpy_helper.from_array(rng.standard_normal((K, 64)).astype(np.float32), "W")])
    result = tune_model(model, 2, tmp_path / "rec.json", progress=lambda _: None, precision="bf16")
    records = json.loads((tmp_path / "rec.json").read_text())["records"]
    assert result.workloads == 1 and [r["rule"] for r in records.values()] == ["matmul-bf16"], records


@requires_bf16
def test_one_cast_feeds_the_matmuls_sharing_an_input(tmp_path):
    """q, k and v's matmuls read one layer norm's output: it is cast to bf16 once, in the norm's own
    kernel, not once per matmul (three cast kernels beside an fp32 norm)."""
    from effc.codegen.build import compile_model, run_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "beta"], ["ln"], axis=-1)]
    for name in "qkv":
        inits.append(numpy_helper.from_array(rng.standard_normal((K, 24)).astype(np.float32) / 6, f"W{name}"))
        nodes.append(helper.make_node("MatMul", ["ln", f"W{name}"], [name]))
    model = model_from_nodes(nodes, [("x", [2, M, K])], [(n, [2, M, 24]) for n in "qkv"], inits)
    result = compile_model(model, "llvm", tmp_path, precision="bf16")
    casts = [name for name in result.kernels if "cast" in name]
    assert len(casts) == 1 and "layer_norm" in casts[0], result.kernels
    feeds = make_inputs(model, 1, seed=2)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.cosine >= 0.999 and dev.max_rel < 2e-2, dev


@requires_bf16
def test_a_patch_embedding_conv_runs_bf16(tmp_path):
    """ViT's patch embedding (a stride = kernel Conv, rewritten to a matmul before the bf16 rewrite
    sees the graph) runs on the bf16 rule too, batch 2, close to fp32 ONNX Runtime."""
    from effc.codegen.build import compile_model, run_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((24, 3, 8, 8)) / 8).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "B")]
    model = model_from_nodes([helper.make_node("Conv", ["x", "W", "B"], ["y"], strides=[8, 8])],
                             [("x", [2, 3, 24, 40])], [("y", [2, 24, 3, 5])], inits)
    result = compile_model(model, "llvm", tmp_path, precision="bf16")
    assert "matmul-bf16" in result.kernels.values(), result.kernels
    feeds = make_inputs(model, 1, seed=3)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.cosine >= 0.999 and dev.max_rel < 2e-2, dev
