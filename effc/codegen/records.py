"""Tuning records: the best knob values per (workload, CPU), as plain JSON that effc owns.

A workload is a kernel's TIR up to names (its structural hash), so one record serves every layer
of a model that has the same shapes, and other models that share them. The file maps
"<cpu>/<hash>" to {"rule", "knobs", "ms", "kernel"}; rules look their knobs up here and use their
defaults when there is no record.
"""

from __future__ import annotations

import json
from pathlib import Path


def workload_key(func, target) -> str:
    from tvm_ffi import (
        structural_hash,  # TVM 0.27: no longer re-exported as tvm.ir.structural_hash
    )

    cpu = str(target.attrs.get("mcpu", "generic")) if target is not None else "generic"
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
