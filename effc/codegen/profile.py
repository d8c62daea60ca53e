"""Per-kernel time of a compiled module, so the next bottleneck is visible.

TVM 0.27's Relax VM has no profiler entry point in this wheel (no `profile` function on the VM
module), but it calls an instrument before and after every call instruction; timing between the two
gives each kernel's wall time. Each call pays a Python round trip (a few microseconds), so the
shares are exact for big kernels and slightly inflated for tiny ones; "total" says how much of the
run the kernels account for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from effc.codegen.apply import kernel_rule

BUILTIN = "(vm builtin)"


@dataclass
class KernelTime:
    name: str
    rule: str  # the schedule rule that took it, BUILTIN for VM builtins, "?" if unknown
    calls: int
    ms: float  # per run, summed over its calls
    share: float  # of the summed kernel time


def profile(compiled, feed: dict, runs: int = 5, warmup: int = 1) -> tuple[list[KernelTime], float]:
    """(kernels sorted slowest first, median wall ms of an instrumented run)."""
    import numpy as np

    vm, args, params = compiled.vm, compiled.args(feed), compiled.params
    totals: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    started: list[float] = []

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            started.append(time.perf_counter())
        else:
            elapsed = time.perf_counter() - started.pop()
            totals.setdefault(symbol, []).append(elapsed)
            calls[symbol] = calls.get(symbol, 0) + 1
        return 0  # VMInstrumentReturnKind.NO_OP

    for _ in range(warmup):
        vm["main"](*args, *params)
    vm.set_instrument(instrument)
    totals.clear()
    calls.clear()
    walls = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            vm["main"](*args, *params)
            if compiled.is_cuda:
                compiled.device.sync()
            walls.append(time.perf_counter() - start)
    finally:
        vm.set_instrument(None)
    kernels = compiled.manifest.get("kernels", {})
    per_run = {s: sum(t) / runs * 1e3 for s, t in totals.items()}
    whole = sum(per_run.values()) or 1.0
    rows = [KernelTime(s, _rule(kernels, s), calls[s] // runs, round(ms, 3), ms / whole)
            for s, ms in per_run.items()]
    rows.sort(key=lambda r: -r.ms)
    return rows, float(np.median(walls) * 1e3)


def _rule(kernels: dict, symbol: str) -> str:
    if symbol.startswith("vm."):
        return BUILTIN
    return kernel_rule(kernels, symbol) or "?"


def by_rule(rows: list[KernelTime]) -> dict[str, float]:
    """Share of kernel time per rule, largest first."""
    shares: dict[str, float] = {}
    for r in rows:
        shares[r.rule] = shares.get(r.rule, 0.0) + r.share
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def table(rows: list[KernelTime], wall_ms: float, top: int = 15) -> str:
    lines = [f"{'kernel':48s} {'rule':14s} {'calls':>5s} {'ms/run':>9s} {'share':>6s}"]
    for r in rows[:top]:
        lines.append(f"{r.name[:48]:48s} {r.rule[:14]:14s} {r.calls:5d} {r.ms:9.3f} {r.share:6.1%}")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"{'(' + str(len(rest)) + ' more)':48s} {'':14s} {sum(r.calls for r in rest):5d} "
                     f"{sum(r.ms for r in rest):9.3f} {sum(r.share for r in rest):6.1%}")
    summed = sum(r.ms for r in rows)
    lines.append(f"kernels total {summed:.2f} ms of {wall_ms:.2f} ms per instrumented run; by rule: "
                 + ", ".join(f"{k} {v:.0%}" for k, v in by_rule(rows).items()))
    return "\n".join(lines)
