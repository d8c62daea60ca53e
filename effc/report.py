"""PassRecord: what the runner measured around one pass; JSON and terminal rendering.

Passes record rewrites and per-layer errors as data (``effc.passes.base.Rewrite`` and
``LayerRecord``); this module is the only place they become text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from effc.passes.base import LayerRecord, Rewrite, Skip


@dataclass
class PassRecord:
    name: str
    exact: bool
    status: str  # applied | skipped | rolled-back
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)  # lossy passes: per rewritten layer
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
        return asdict(self)


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


def _roles(roles: list) -> str:
    return " and ".join(r["role"] + (" (zeroed: the same for every channel)" if r.get("zeroed") else "")
                        for r in roles)


_REWRITE_TEXT = {
    "fold-after": lambda n, d: f"{d['site']} -> {d['into_op']} '{d['into']}' (after)",
    "fold-before": lambda n, d: f"{d['site']} -> {d['into_op']} '{d['into']}' (before)",
    "recentre": lambda n, d: f"recentred {d['op']} '{n}' {_roles(d['roles'])}",
    "untie": lambda n, d: (f"untied '{n}': the stream gets a recentred copy, {', '.join(d['readers'])} keeps "
                           "the original"),
    "keep-tied": lambda n, d: (f"kept '{n}' tied: {', '.join(repr(h) for h in d['heads'])} corrected by ReduceSum(x) "
                               f"* row means (+{d['parameters']} parameters, not an untied copy)"),
    "fold-layerscale": lambda n, d: f"folded LayerScale Mul '{n}' into its writers",
    "centre-stream-start": lambda n, d: (f"centred the stream where it starts: {d['site']} output '{d['output']}' "
                                         "minus its mean"),
    "to-rms": lambda n, d: f"{d['site']} -> {d['target']}" + (" + Add(beta)" if d.get("beta") else ""),
    "quantize": lambda n, d: (f"{n} [{d['k']}x{d['n']}] -> {d['mode']}: int{d['bits']} weights "
                              f"({'per channel' if d['block'] == 'per-channel' else 'block ' + str(d['block'])}{', GPTQ' if d.get('gptq') else ''}, clip {d['weight_clip_ratio']:g})"
                              + (f", {d['act_dtype']} activations scale {d['act_scale']:.3g} zero point "
                                 f"{d['act_zero_point']} (clip {d['act_clip_ratio']:g}"
                                 + (f", {d['calibrate']}" if d.get("calibrate") else "") + ")"
                                 if isinstance(d.get("act_scale"), float) else
                                 ", activations quantized at run time" if d.get("act_scale") == "dynamic" else "")),
    "smooth": lambda n, d: (f"SmoothQuant (alpha {d['alpha']:g}) of '{n}': 1/s into {d['into']}, s into "
                            f"{', '.join(d['readers'])} (s in [{d['scale_min']:.3g}, {d['scale_max']:.3g}])"),
    "repq": lambda n, d: (f"RepQ-ViT of '{n}': per-channel ranges -> one, (x + t) / s folded into {d['into']}, "
                          f"s and W t into {', '.join(d['readers'])} (s in [{d['scale_min']:.3g}, {d['scale_max']:.3g}])"),
    "shift-add": lambda n, d: (f"{n} [{d['k']}x{d['n']}] -> {d['op']}: {d['bits']} planes, group {d['group']}, "
                               f"{d['bits_per_weight']:.2f} bits/weight, output error {d['weight_error']:.3g}"
                               + ("" if d.get("compensated") else ", rounded without compensation")),
}


def render_rewrite(rewrite: Rewrite | dict[str, Any] | str) -> str:
    """One line for a rewrite: a Rewrite, its JSON dict, or an old report's string as it was."""
    if isinstance(rewrite, str):
        return rewrite
    if isinstance(rewrite, Rewrite):
        rewrite = asdict(rewrite)
    node, action, details = rewrite.get("node", "?"), rewrite.get("action", "?"), rewrite.get("details") or {}
    text = _REWRITE_TEXT.get(action)
    if text is not None:
        try:
            return text(node, details)
        except (KeyError, TypeError, ValueError):
            pass  # a record from another version: fall back to the generic form
    extra = ", ".join(f"{k}={v}" for k, v in details.items())
    return f"{node}: {action}" + (f" ({extra})" if extra else "")


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pass's per-layer records, worst first: lowest cosine, then highest relative error
    (layers measured on nothing go last)."""
    rows = [{"pass": p["name"], **layer} for p in report.get("passes", []) for layer in p.get("layers") or []]

    def badness(row: dict[str, Any]) -> tuple:
        cosine, rel = row.get("cosine"), row.get("rel_error")
        return (cosine is None, cosine if cosine is not None else 0.0, -(rel or 0.0))

    return sorted(rows, key=badness)


def render_layers(report: dict[str, Any]) -> Any:
    """A rich Table of the per-layer errors and sizes, worst layer first."""
    from rich.table import Table

    table = Table(title="per-layer error of lossy passes (worst first)")
    for col in ("pass", "layer", "rel err", "cosine", "bytes", "ratio", "measured on"):
        table.add_column(col, justify="left" if col in ("pass", "layer", "measured on") else "right", no_wrap=True)
    for row in layer_rows(report):
        rel, cosine = row.get("rel_error"), row.get("cosine")
        before, after = row.get("bytes_before", 0), row.get("bytes_after", 0)
        table.add_row(row["pass"], row["node"], "-" if rel is None else f"{rel:.3e}",
                      "-" if cosine is None else f"{cosine:.6f}", f"{before:,} -> {after:,}",
                      f"{before / after:.2f}x" if after else "-", row.get("data", ""))
    return table
