"""The host target names the features the host reports even when LLVM's name for its CPU lacks them
(a VM reporting an Emerald Rapids as model 167, which LLVM calls rocketlake): otherwise bf16 and AMX
are silently built as fp32."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

EMERALD_RAPIDS_FLAGS = {"avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}


def test_features_the_cpu_name_lacks_are_added():
    from effc.codegen.target import host_mattr

    assert host_mattr("rocketlake", EMERALD_RAPIDS_FLAGS) == [
        "+amx-bf16", "+amx-int8", "+amx-tile", "+avx512bf16", "+avx512fp16"]


def test_a_name_that_has_them_gets_none():
    from effc.codegen.target import host_mattr

    assert host_mattr("sapphirerapids", EMERALD_RAPIDS_FLAGS) == []
    assert host_mattr("znver4", {"avx512_bf16", "avx512_vnni"}) == []


def test_bf16_is_chosen_on_such_a_host():
    import tvm

    from effc.codegen.precision import choose

    target = tvm.target.Target({"kind": "llvm", "mcpu": "rocketlake", "mattr": ["+avx512bf16", "+amx-bf16"]})
    taken, why = choose("auto", target)
    assert taken == "bf16" and "amx" in why, why


def test_a_named_cpu_gets_only_its_own_features():
    from effc.codegen.target import llvm_target

    assert "mattr" not in llvm_target(1, mcpu="haswell").spec
