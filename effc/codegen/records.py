"""Tuning records: the best knob values per (workload, CPU), as plain JSON that effc owns.

A workload is a kernel's TIR up to names (its structural hash), so one record serves every layer
of a model that has the same shapes, and other models that share them. The file maps
"<cpu>/<hash>" to {"rule", "knobs", "ms", "kernel"}; rules look their knobs up here and use their
defaults when there is no record.

effc ships records for the zoo models in effc/codegen/tuned/<cpu>.json (one file per CPU family,
as TVM names it: emeraldrapids, znver5, rocketlake-amx, ...); `effc compile` applies the file of the host's family
unless told `--records none` or given a file of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED = "shipped"  # compile's default: the shipped records of the host's CPU family, if any
NONE = "none"
TUNED_DIR = Path(__file__).parent / "tuned"


def cpu_family(target) -> str:
    """The CPU family records are kept for: LLVM's -mcpu name, marked "-amx" where the target adds
    AMX to a name without it (effc.codegen.target.host_mattr: a VM's Emerald Rapids seen as
    rocketlake), so its records are not applied to the CPU the name really means."""
    if target is None:
        return "generic"
    cpu = str(target.attrs.get("mcpu", "generic"))
    mattr = [str(a) for a in target.attrs.get("mattr", None) or ()]
    return f"{cpu}-amx" if "+amx-tile" in mattr else cpu


def shipped_path(target) -> Path | None:
    """The records effc ships for ``target``'s CPU family, when there are any."""
    path = TUNED_DIR / f"{cpu_family(target)}.json"
    return path if path.exists() else None


def resolve_records(spec: str | Path | None, target) -> tuple[dict, str | None]:
    """(records, where they came from) for compile's ``records`` argument: SHIPPED, NONE/None or a file."""
    if spec is None or str(spec) == NONE:
        return {}, None
    if str(spec) == SHIPPED:
        path = shipped_path(target)
        return (load_records(path), f"shipped:{path.name}") if path else ({}, None)
    return load_records(spec), str(spec)


def workload_key(func, target) -> str:
    from tvm_ffi import (
        structural_hash,  # TVM 0.27: no longer re-exported as tvm.ir.structural_hash
    )

    cpu = cpu_family(target)
    # Fused kernels carry no global_symbol yet; the hash ignores variable names (map_free_vars).
    return f"{cpu}/{structural_hash(func, map_free_vars=True) & (2 ** 64 - 1):016x}"


def load_records(path: str | Path | None) -> dict:
    if path is None or not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text())
    return data.get("records", {})


def save_records(path: str | Path, records: dict) -> None:
    from effc.ir import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps({"format": "effc-records-1", "records": records}, indent=1,
                                             sort_keys=True) + "\n")


def knobs_for(records: dict | None, rule: str, func, target) -> dict:
    """The recorded knobs of ``rule`` for this workload, or {} (the rule's defaults)."""
    if not records:
        return {}
    record = records.get(workload_key(func, target))
    return dict(record["knobs"]) if record and record.get("rule") == rule else {}
