"""--precision bf16 convolutions: conv_gemm's GEMMs take bf16 operands (the weight cast at compile
time, col gathered as bf16) on the matmul-bf16 rule, fp32 accumulation, the epilogue in fp32. Each
case is compiled for llvm, compared with fp32 ONNX Runtime at a bf16 bound, and must show bf16
rounding (else the GEMM ran in fp32); the manifest must name the bf16 rule for every conv GEMM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes
from tests.codegen.test_matmul_bf16 import requires_bf16

pytest.importorskip("tvm")

MAX_REL = 2e-2  # one conv's bf16 rounding (8-bit operands, k up to 216 taps), as the bf16 matmul test's
MIN_COSINE = 0.999


def _conv_model(n, c, spatial, o, k, stride, pad, groups, residual=False, seed=0):
    """Conv (+ bias) -> Relu over ``spatial`` (a list: 1-D or 2-D); ``residual``: + x first (o == c)."""
    rng = np.random.default_rng(seed)
    dims = len(spatial)
    w = rng.standard_normal((o, c // groups, *[k] * dims)) / np.sqrt(c // groups * k ** dims)
    inits = [numpy_helper.from_array(w.astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], strides=[stride] * dims, pads=[pad] * (2 * dims),
                              group=groups)]
    if residual:
        nodes += [helper.make_node("Add", ["c", "x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    out = [(size + 2 * pad - k) // stride + 1 for size in spatial]
    return model_from_nodes(nodes, [("x", [n, c, *spatial])], [("y", [n, o, *out])], inits)


CASES = {  # n, c, spatial, o, k, stride, pad, groups, residual
    "1x1 (pixels as rows)": (2, 24, [9, 9], 32, 1, 1, 0, 1, False),
    "3x3 s1 + residual": (2, 32, [13, 13], 32, 3, 1, 1, 1, True),
    "3x3 s2": (2, 16, [14, 14], 32, 3, 2, 1, 1, False),
    "1-D k3": (2, 20, [37], 24, 3, 1, 1, 1, False),
    "13x11": (1, 16, [13, 11], 48, 3, 1, 1, 1, False),
    "groups 2": (2, 16, [9, 9], 32, 3, 1, 1, 2, False),
}


@requires_bf16
@pytest.mark.parametrize("case", list(CASES))
def test_conv_gemm_in_bf16_close_to_fp32_ort(tmp_path, case):
    from effc.codegen.build import compile_model, run_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    n, c, spatial, o, k, stride, pad, groups, residual = CASES[case]
    model = _conv_model(n, c, spatial, o, k, stride, pad, groups, residual)
    result = compile_model(model, "llvm", tmp_path, precision="bf16")
    kernels = json.loads((tmp_path / "codegen.json").read_text())["kernels"]
    gemms = {name: rule for name, rule in kernels.items() if "conv_gemm" in name}
    assert result.precision == "bf16" and gemms and set(gemms.values()) == {"matmul-bf16"}, kernels
    feeds = make_inputs(model, 2, seed=5)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.cosine >= MIN_COSINE and dev.max_rel < MAX_REL, dev
    assert dev.max_rel > 1e-5, f"{dev}: no bf16 rounding at all, so the conv GEMM did not run in bf16"


@requires_bf16
def test_bf16_weights_ship_as_bf16_and_stem_stays_fp32(tmp_path):
    """The conv's weight ships as bf16 (cast at compile time, not per call); an RGB stem (3 input
    channels: the window rule's direct conv) stays fp32 and exact."""
    import tvm

    from effc.codegen.build import compile_model, run_compiled
    from effc.verify import OrtRunner, deviation, make_inputs

    model = _conv_model(1, 16, [10, 10], 32, 3, 1, 1, 1)
    compile_model(model, "llvm", tmp_path / "conv", precision="bf16")
    params = tvm.runtime.load_param_dict_from_file(str(tmp_path / "conv" / "params.bin")).values()
    shipped = [(tuple(p.shape), str(p.dtype)) for p in params]
    assert [d for _, d in shipped].count("bfloat16") == 1, shipped  # the weight, [o, k] in bf16
    assert all(d == "bfloat16" or np.prod(s) == 32 for s, d in shipped), shipped  # fp32: the bias alone

    stem = _conv_model(1, 3, [20, 20], 8, 7, 2, 3, 1)
    result = compile_model(stem, "llvm", tmp_path / "stem", precision="bf16")
    assert "window" in result.kernels.values() and "matmul-bf16" not in result.kernels.values(), result.kernels
    feeds = make_inputs(stem, 1, seed=2)
    assert deviation(run_compiled(tmp_path / "stem", feeds), OrtRunner(stem).run_all(feeds)).max_rel < 1e-4
