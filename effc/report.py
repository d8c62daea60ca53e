"""PassRecord: what the runner measured around one pass; JSON and terminal rendering."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from effc.passes.base import Skip


@dataclass
class PassRecord:
    name: str
    exact: bool
    status: str  # applied | skipped | rolled-back
    rewrites: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    error: dict[str, float] | None = None
    tolerance: float | None = None
    note: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped]
        return data


def write_report(path: str | Path, model_name: str, records: list[PassRecord], extra: dict[str, Any] | None = None) -> None:
    from effc.ir import atomic_write_text

    body = {"model": model_name, "passes": [r.as_dict() for r in records], **(extra or {})}
    atomic_write_text(Path(path), json.dumps(body, indent=2, default=str) + "\n")


def load_report(path: str | Path) -> dict[str, Any]:
    from effc.errors import EffcError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EffcError(f"{path}: no such report") from None
    except json.JSONDecodeError as exc:
        raise EffcError(f"{path}: not a JSON report ({exc.msg})") from None
    except UnicodeDecodeError:
        raise EffcError(f"{path}: not a JSON report (binary data)") from None
    except IsADirectoryError:
        raise EffcError(f"{path}: is a directory without report.json") from None


def op_delta(before: dict[str, int], after: dict[str, int]) -> str:
    parts = []
    for op in sorted(set(before) | set(after)):
        d = after.get(op, 0) - before.get(op, 0)
        if d:
            parts.append(f"{op} {d:+d}")
    return ", ".join(parts) if parts else "-"


def reason_lines(report: dict[str, Any], examples: int = 3) -> list[str]:
    """Why each pass skipped what it skipped, one line per distinct reason (with a few node names), and
    each pass's note (rolled back, nothing to do)."""
    lines = []
    for p in report.get("passes", []):
        by_reason: dict[str, list[str]] = {}
        for skip in p.get("skipped", []):
            by_reason.setdefault(skip["reason"], []).append(skip["node"])
        for reason, nodes in by_reason.items():
            shown = ", ".join(nodes[:examples]) + (f", +{len(nodes) - examples}" if len(nodes) > examples else "")
            lines.append(f"  [{p['name']}] skipped {len(nodes)} ({shown}): {reason}")
        if p.get("note"):
            lines.append(f"  [{p['name']}] {p['status']}: {p['note']}")
    return lines


def render_table(report: dict[str, Any]) -> Any:
    """A rich Table of the per-pass records."""
    from rich.table import Table

    table = Table(title=f"effc passes on {Path(str(report.get('model', '?'))).name}")
    for col in ("pass", "status", "rewrites", "skipped", "op changes", "params", "GFLOPs", "max rel err", "cosine", "s"):
        left = col in ("pass", "status", "op changes")
        # names and numbers must stay greppable; only the op-delta text may wrap
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "op changes")
    for p in report.get("passes", []):
        err = p.get("error") or {}
        table.add_row(
            p["name"], p["status"], str(len(p.get("rewrites", []))), str(len(p.get("skipped", []))),
            op_delta(p.get("ops_before", {}), p.get("ops_after", {})),
            f"{p.get('params_before', 0):,} -> {p.get('params_after', 0):,}",
            f"{p.get('flops_before', 0) / 1e9:.3f} -> {p.get('flops_after', 0) / 1e9:.3f}",
            f"{err['max_rel']:.2e}" if "max_rel" in err else "-",
            f"{err['cosine']:.6f}" if "cosine" in err else "-",
            f"{p.get('seconds', 0):.2f}",
        )
    return table
