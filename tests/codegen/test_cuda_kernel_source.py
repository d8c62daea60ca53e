"""Two CUDA miscompiles found on an H100 (tools/check_cuda_kernels.py) and worked around in effc,
checked here in the generated CUDA source (nvcc needed, no GPU):
- a bool mask fused into a matmul's vectorised write-back was read as ``ushort2`` (4 bytes for 2
  bools): effc.codegen.cuda_bool_loads keeps bool loads scalar;
- ``powf`` of a negative base is NaN under the fast math TVM builds with: x**3 becomes multiplies."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA builds need it")

HEADS, SEQ, HD = 4, 128, 32


def cuda_sources(model) -> dict[str, str]:
    """Kernel name -> CUDA source, scheduled as `effc compile --target cuda` schedules it."""
    from effc.codegen import lower
    from effc.codegen.relax_import import import_model
    from effc.codegen.schedules import rules_for
    from effc.codegen.target import cuda_target

    gpu = cuda_target("sm_90").tvm()
    scheduled = lower.schedule(import_model(model, gpu).mod, gpu, rules_for(gpu))
    sources = {}
    for gv, func in scheduled.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            name = gv.name_hint
            lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=gpu)
            sources[name] = lib.mod.imports[0].inspect_source()
    return sources


def test_masked_scores_read_the_bool_mask_one_byte_at_a_time():
    causal = np.triu(np.ones((SEQ, SEQ), bool), 1)
    inits = [numpy_helper.from_array(causal, "mask"), numpy_helper.from_array(np.float32(-1e9), "fill"),
             numpy_helper.from_array(np.float32(HD ** -0.5), "scale")]
    nodes = [helper.make_node("MatMul", ["q", "k"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["s"]),
             helper.make_node("Where", ["mask", "fill", "s"], ["y"])]
    model = model_from_nodes(nodes, [("q", [1, HEADS, SEQ, HD]), ("k", [1, HEADS, HD, SEQ])], [("y", [1, HEADS, SEQ, SEQ])],
                             inits)
    sources = cuda_sources(model)
    fused = [src for src in sources.values() if "bool*" in src]
    assert len(fused) == 1, list(sources)  # matmul, scale and where in one kernel
    mask = re.search(r"bool\* __restrict__ (\w+)", fused[0]).group(1)
    vector_reads = re.findall(rf"\*\(\w+\d\*\)\({mask}\b", fused[0])
    assert not vector_reads and f"{mask}[" in fused[0]
    assert "float2" in fused[0] or "float4" in fused[0]  # the matmul itself stays vectorised


def test_cube_is_multiplies_not_powf():
    inits = [numpy_helper.from_array(np.float32(3.0), "three")]
    nodes = [helper.make_node("Pow", ["x", "three"], ["y"])]
    model = model_from_nodes(nodes, [("x", [4, 256])], [("y", [4, 256])], inits)
    sources = cuda_sources(model)
    assert sources and not any("pow" in src.split("extern \"C\"", 1)[-1] for src in sources.values())
