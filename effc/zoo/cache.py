"""Build zoo models once and keep them in a cache directory (builds are deterministic)."""

from __future__ import annotations

import os
from pathlib import Path

from effc.ir import save


def cache_dir() -> Path:
    root = os.environ.get("EFFC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "effc")
    return Path(root) / "zoo"


def cached_model_path(name: str) -> Path:
    """Path of the built ONNX file for zoo model ``name``, building it on first use."""
    from effc import zoo

    module = zoo.get(name)
    version = getattr(module, "VERSION", 1)
    path = cache_dir() / f"{name}-v{version}" / "model.onnx"
    if not path.exists():
        save(module.build(), path)
    return path
