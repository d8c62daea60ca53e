"""effc's native (C) kernels: compiled once per source, linked into model.so at export, and loaded
into this process for in-process builds (tests, the kernel checks), so extern calls resolve.

A module calling them still loads with plain TVM: the object is linked into model.so itself."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from effc.errors import EffcError

HERE = Path(__file__).parent
FLAGS = {"bf16_tile": ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fPIC"],
         "attention_f32": ["-O3", "-mavx512f", "-fPIC"],
         "int8_tile": ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-fPIC"]}
_loaded: dict[str, ctypes.CDLL] = {}


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if not cc:
        raise EffcError("effc's C kernels (bf16 and int8 tiles, fused attention) need a C compiler (gcc, cc or clang; or set CC)")
    return cc


def _cache() -> Path:
    root = os.environ.get("EFFC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "effc")
    path = Path(root) / "native"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(name: str, suffix: str, extra: list[str]) -> Path:
    """``name``.c compiled with its flags (+ ``extra``) into the cache, once per source and flags."""
    source = HERE / f"{name}.c"
    flags = FLAGS[name] + extra
    headers = b"".join(h.read_bytes() for h in sorted(HERE.glob("*.h")))  # amx.h: a change rebuilds
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:16]
    out = _cache() / f"{name}-{digest}{suffix}"
    if not out.exists():
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        proc = subprocess.run([_compiler(), *flags, str(source), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EffcError(f"compiling {source.name} failed: {proc.stderr.strip()[:300]}")
        os.replace(tmp, out)
    return out


def object_file(name: str) -> Path:
    """The object to link into an exported model.so; its symbols hidden there, so a model.so always
    calls its own copy (not one another module or load() put in the process first)."""
    return _build(name, ".o", ["-c", "-fvisibility=hidden"])


def load(name: str) -> None:
    """Make ``name``'s symbols visible to modules built in this process (RTLD_GLOBAL)."""
    if name not in _loaded:
        _loaded[name] = ctypes.CDLL(str(_build(name, ".so", ["-shared"])), mode=ctypes.RTLD_GLOBAL)
