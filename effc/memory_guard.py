"""Refuse a model whose tensors would not fit in memory, before anything runs it.

A node needs its inputs and outputs at once, so the largest such working set (sizes from the
inferred shapes; symbolic dims at effc's default input sizes) is a lower bound on the peak of any
run. A 200-byte model that Expands to 40000 x 40000 is refused here instead of taking the machine.
The limit: --max-memory, else EFFC_MAX_MEMORY, else a quarter of the physical memory or half of
what is available now, whichever is less (machines here are shared; ONNX Runtime also needs room
for the copies around a node, so a working set past that point would swap or be killed).
"""

from __future__ import annotations

import math
import os
import re

import onnx_ir as ir

from effc.errors import EffcError

ENV = "EFFC_MAX_MEMORY"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_limit: list[int] = []  # set by the command line (--max-memory)


def parse_size(text: str) -> int:
    """'512M', '8G', '1.5T', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise EffcError(f"memory limit '{text}': expected a size such as 512M, 8G or 1.5T")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def set_limit(nbytes: int | None) -> None:
    _limit[:] = [nbytes] if nbytes else []


def limit() -> int:
    if _limit:
        return _limit[0]
    if os.environ.get(ENV):
        return parse_size(os.environ[ENV])
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(physical // 4, _available() // 2)


def _available() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tensor_bytes(value: ir.Value | None, default_dim: int = 16) -> int:
    """Bytes of ``value`` from its inferred shape (0 when unknown)."""
    if value is None or value.shape is None or value.dtype is None:
        return 0
    dims = [d if isinstance(d, int) else default_dim for d in value.shape]
    if any(d < 0 for d in dims):
        return 0
    try:
        itemsize = value.dtype.itemsize
    except Exception:
        itemsize = 4
    return math.prod(dims) * math.ceil(itemsize)


def largest_working_set(model: ir.Model) -> tuple[int, ir.Node | None, ir.Value | None]:
    """(bytes, node, its largest value) for the node whose inputs and outputs together are largest."""
    best: tuple[int, ir.Node | None, ir.Value | None] = (0, None, None)
    for node in model.graph:
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        sizes = [tensor_bytes(v) for v in values]
        total = sum(sizes)
        if total > best[0]:
            best = (total, node, values[sizes.index(max(sizes))])
    return best


def check(model: ir.Model, max_bytes: int | None = None) -> None:
    """Raise EffcError when a node's working set exceeds the limit."""
    cap = max_bytes if max_bytes is not None else limit()
    need, node, value = largest_working_set(model)
    if need > cap:
        shape = list(value.shape) if value is not None and value.shape is not None else "?"
        raise EffcError(f"the model needs about {human(need)} at once (node '{node.name or node.op_type}' "
                        f"({node.op_type}): '{value.name}' {shape} {value.dtype.name if value.dtype else ''}), "
                        f"over the memory limit {human(cap)}; raise it with --max-memory or {ENV} if the machine "
                        "has the memory")


def human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if nbytes < 1024 or unit == "EiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f}"
