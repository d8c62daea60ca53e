"""Skip marks for tests that need hardware or tools a machine may lack, each saying what is missing.

A check that needs a GPU is its own test marked ``requires_gpu``, never an ``if`` inside a test that
passes either way: the skip shows in the summary, so a machine without one cannot pass it silently.
"""

from __future__ import annotations

import shutil

import pytest


def gpu_present() -> bool:
    try:
        import tvm
    except ImportError:
        return False
    return bool(tvm.cuda(0).exist)


def gpu_arch() -> str:
    """The present GPU's arch as effc's --arch names it (sm_90 for an H100/H200)."""
    import tvm

    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def host_has_avx512() -> bool:
    """Whether the llvm target effc builds for on this host has AVX-512F (the CPU shift-add kernels need it)."""
    try:
        from tvm.target.codegen import llvm_cpu_has_features
    except ImportError:
        return False
    from effc.codegen.target import make_target

    return bool(llvm_cpu_has_features(["avx512f"], make_target("llvm").tvm()))


def host_has(feature: str) -> bool:
    """Whether the llvm target effc builds for on this host has ``feature`` (LLVM's name: avx512bf16,
    avx512vnni, ...)."""
    try:
        from tvm.target.codegen import llvm_cpu_has_features
    except ImportError:
        return False
    from effc.codegen.target import make_target

    return bool(llvm_cpu_has_features([feature], make_target("llvm").tvm()))


requires_gpu = pytest.mark.skipif(not gpu_present(), reason="no CUDA GPU visible to TVM here")
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA builds need it")
requires_avx512 = pytest.mark.skipif(not host_has_avx512(),
                                     reason="this CPU lacks AVX-512F: the CPU shift-add kernels are not built here")
requires_avx512_bf16 = pytest.mark.skipif(not host_has("avx512bf16"),
                                          reason="this CPU lacks AVX-512 BF16: --precision bf16 builds fp32 here")
requires_vnni = pytest.mark.skipif(not host_has("avx512vnni"),
                                   reason="this CPU lacks AVX-512 VNNI: QDQ matmuls run on the float path here")
