"""--precision for --target llvm: which arithmetic the float matmuls get, and why.

fp32: every matmul in fp32 (the default). bf16: matmuls from bf16 operands with fp32 accumulation
(effc.codegen.bf16_matmul) where the CPU has AVX-512 BF16: on AMX tiles (tdpbf16ps) where it has
AMX-BF16 and Linux grants the process tile state, else vdpbf16ps; elsewhere fp32, said so,
never a crash. auto: bf16 where the CPU has avx512bf16 (as OpenVINO's default does, on AMX where present),
else fp32. A bf16 module is verified against fp32 ONNX Runtime at BF16_TOLERANCE, not at fp32's."""

from __future__ import annotations

from effc.errors import EffcError

PRECISIONS = ("fp32", "bf16", "auto")
BF16_MAX_REL = 0.1  # scale-relative; bf16 rounding of operands (8-bit mantissa) over a deep model
BF16_MIN_COSINE = 0.999  # a wrong kernel falls far below this; rounding does not
BF16_ROUNDING = 2.0 ** -8  # bf16's unit roundoff (8 significant bits): how far a value it rounds moves


def check_precision(requested: str, target: str | None) -> None:
    """Validate --precision before any expensive work."""
    if requested not in PRECISIONS:
        raise EffcError(f"unknown precision '{requested}' (known: {', '.join(PRECISIONS)})")
    if requested != "fp32" and target != "llvm":
        raise EffcError("--precision bf16/auto applies to --target llvm only")


def cpu_features(tvm_target) -> set[str]:
    """LLVM's feature names of ``tvm_target``'s CPU (empty when it cannot say)."""
    import tvm

    try:
        return {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm_target)}
    except Exception:  # noqa: BLE001 (not an llvm target)
        return set()


def choose(requested: str, tvm_target) -> tuple[str, str]:
    """(the precision taken, why) for ``requested`` on ``tvm_target``."""
    if requested == "fp32" or tvm_target.kind.name != "llvm":
        return "fp32", "fp32 requested" if requested == "fp32" else "bf16 is for --target llvm only"
    features = cpu_features(tvm_target)
    cpu = str(tvm_target.attrs.get("mcpu", "generic"))
    if "avx512bf16" in features and "amx-bf16" in features:
        return "bf16", (f"{cpu} has amx-bf16: bf16 matmuls on AMX tiles (tdpbf16ps), fp32 accumulation; "
                        "avx512bf16 (vdpbf16ps) where the OS grants no tile state")
    if "avx512bf16" in features:
        return "bf16", f"{cpu} has avx512bf16: bf16 matmuls on vdpbf16ps, fp32 accumulation"
    why = f"{cpu} has no avx512bf16"
    return "fp32", f"{why}: fp32 matmuls" + (" (bf16 requested)" if requested == "bf16" else "")


def float_bound(precision: str, fp32_tol: float) -> float:
    """The max_rel a float (unquantized) module of ``precision`` is held to."""
    return BF16_MAX_REL if precision == "bf16" else fp32_tol


def within_tolerance(precision: str, dev, fp32_tol: float) -> bool:
    """Whether a module of ``precision`` deviating ``dev`` (effc.verify.Deviation) from fp32 ONNX
    Runtime is right."""
    if precision == "bf16":  # ``fp32_tol`` beyond BF16_MAX_REL: a QDQ model's steps flipped by bf16 rounding
        return dev.max_rel <= max(BF16_MAX_REL, fp32_tol) and dev.cosine >= BF16_MIN_COSINE
    return dev.max_rel <= fp32_tol
