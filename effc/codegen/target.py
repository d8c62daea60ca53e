"""Build targets: the host CPU (detected, never `mcpu=native`) or a CUDA arch built without a GPU."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from effc.errors import EffcError

CUDA_ARCHS = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90")


def host_threads() -> int:
    """Cores this process may run on (affinity-aware, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class BuildTarget:
    """What to build for; ``spec`` is the TVM target as a JSON dict (TVM 0.27 refuses strings)."""

    kind: str  # "llvm" | "cuda"
    spec: dict
    threads: int = 1  # runtime threads for llvm; recorded in the build manifest
    arch: str | None = None

    def tvm(self):
        import tvm

        return tvm.target.Target(self.spec)

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"cuda {self.arch}"
        return f"llvm {self.spec.get('mcpu', 'generic')} x{self.threads}"


def llvm_target(threads: int | None = None, mcpu: str | None = None) -> BuildTarget:
    """The host CPU as TVM detects it (e.g. znver5, emeraldrapids): `mcpu=native` silently builds
    generic code in TVM 0.27, so the detected name is what enables AVX-512. ``mcpu``: build for
    another x86 CPU instead (e.g. haswell: AVX2 code that any AVX2 host runs)."""
    import tvm

    detected = tvm.target.Target.from_device(tvm.cpu()).export()
    threads = threads or host_threads()
    spec = {"kind": "llvm", "mtriple": detected.get("mtriple", "x86_64-linux-gnu"),
            "mcpu": mcpu or detected.get("mcpu", "generic"), "num-cores": threads}
    extra = [] if mcpu else host_mattr(spec["mcpu"], cpuinfo_flags())
    if extra:
        spec["mattr"] = extra
    return BuildTarget("llvm", spec, threads)


# /proc/cpuinfo flag -> LLVM feature, for the features effc's rules and kernels select on
CPUINFO_FEATURES = {"avx512_bf16": "avx512bf16", "avx512_vnni": "avx512vnni", "avx512_fp16": "avx512fp16",
                    "avx_vnni": "avxvnni", "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8"}


def host_mattr(mcpu: str, flags: set[str]) -> list[str]:
    """``+feature`` for each feature the host reports (``flags``, /proc/cpuinfo's names) that LLVM's
    ``mcpu`` lacks. A VM may report a CPU model older than its features (an Emerald Rapids guest seen
    as model 167, which LLVM names rocketlake: no avx512bf16, no AMX), so the name alone would
    silently build bf16 as fp32."""
    import tvm

    wanted = [CPUINFO_FEATURES[f] for f in sorted(flags) if f in CPUINFO_FEATURES]
    if not wanted:
        return []
    named = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))}
    return [f"+{f}" for f in wanted if f not in named]


def cpuinfo_flags() -> set[str]:
    """The CPU flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_bytes(target=None) -> int:
    """Bytes of one SIMD register on ``target`` (a tvm Target; None: the current one, else the
    host): 64 with AVX-512, 32 with AVX2, else 16 (SSE, NEON). Read from the features LLVM derives
    from the target's -mcpu/-mattr, never from the machine that builds, so a cross build for an
    older CPU gets that CPU's width. The CPU rules size every vector and register tile from it."""
    return _vector_bytes(_llvm(target))


def vector_registers(target=None) -> int:
    """SIMD registers the CPU has (x86-64: 32 with AVX-512, else 16): how many accumulators a
    register tile can keep."""
    return 32 if _vector_bytes(_llvm(target)) >= 64 else 16


def cpu_has(target, *features: str) -> bool:
    """Whether ``target`` (a tvm Target) is an llvm CPU with every one of LLVM's ``features``
    (e.g. "avx512f", "avx512vnni", "amx-int8"): the one feature query of the CPU rules and lowerings."""
    from tvm.target.codegen import target_has_features

    if target.kind.name != "llvm":
        return False
    try:
        return all(bool(target_has_features(feature, target)) for feature in features)
    except Exception:  # noqa: BLE001 (no LLVM feature query for this target)
        return False


def _llvm(target):
    import tvm

    target = target if target is not None else tvm.target.Target.current(allow_none=True)
    return target if target is not None else llvm_target().tvm()


@functools.lru_cache(maxsize=32)
def _features(mtriple: str | None, mcpu: str | None, mattr: tuple) -> tuple[bool, bool]:
    import tvm
    from tvm.target.codegen import target_has_features

    spec = {"kind": "llvm", **({"mtriple": mtriple} if mtriple else {}), **({"mcpu": mcpu} if mcpu else {}),
            **({"mattr": list(mattr)} if mattr else {})}
    target = tvm.target.Target(spec)
    return bool(target_has_features("avx512f", target)), bool(target_has_features("avx2", target))


def _vector_bytes(target) -> int:
    if target.kind.name != "llvm":
        return 16
    attrs = target.attrs
    mattr = tuple(str(a) for a in attrs.get("mattr", None) or ())
    text = lambda key: str(attrs[key]) if attrs.get(key, None) is not None else None  # noqa: E731
    avx512, avx2 = _features(text("mtriple"), text("mcpu"), mattr)
    return 64 if avx512 else 32 if avx2 else 16


def cuda_target(arch: str = "sm_80") -> BuildTarget:
    """A CUDA target for ``arch``; building needs nvcc but no GPU (the arch is never queried)."""
    if arch not in CUDA_ARCHS:
        raise EffcError(f"unknown CUDA arch '{arch}' (known: {', '.join(CUDA_ARCHS)})")
    host = llvm_target().spec
    # Explicit limits keep TVM from querying a device that is not there.
    spec = {"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32,
            "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "host": host}
    return BuildTarget("cuda", spec, 1, arch)


def check_target_args(kind: str, arch: str | None) -> None:
    """Validate --target/--arch without importing TVM (fail before any expensive work)."""
    if kind not in ("llvm", "cuda"):
        raise EffcError(f"unknown target '{kind}' (known: llvm, cuda)")
    if arch and kind != "cuda":
        raise EffcError("--arch applies to --target cuda only")
    if arch and arch not in CUDA_ARCHS:
        raise EffcError(f"unknown CUDA arch '{arch}' (known: {', '.join(CUDA_ARCHS)})")


def make_target(kind: str, arch: str | None = None, threads: int | None = None) -> BuildTarget:
    if kind == "llvm":
        if arch:
            raise EffcError("--arch applies to --target cuda only")
        return llvm_target(threads)
    if kind == "cuda":
        return cuda_target(arch or "sm_80")
    raise EffcError(f"unknown target '{kind}' (known: llvm, cuda)")


def gpu_present() -> bool:
    """Whether TVM sees a CUDA device here (a CUDA build can only run, and be checked, where one is)."""
    import tvm

    return bool(tvm.cuda(0).exist)
