"""Build zoo models once and keep them in a cache directory (builds are deterministic)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from effc.ir import save

WEIGHTS_DIR = Path(__file__).parent / "weights"


def cache_dir() -> Path:
    root = os.environ.get("EFFC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "effc")
    return Path(root) / "zoo"


def _fingerprint(module) -> str:
    """Hash of what a build depends on: the module's source and its shipped weights
    (``weights/<module>.*``), so retrained weights or an edited builder never reuse a stale file."""
    digest = hashlib.sha256()
    source = Path(module.__file__)
    digest.update(source.read_bytes())
    for weights in sorted(WEIGHTS_DIR.glob(source.stem + ".*")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:12]


def cached_model_path(name: str) -> Path:
    """Path of the built ONNX file for zoo model ``name``, building it on first use."""
    from effc import zoo

    module = zoo.get(name)
    version = getattr(module, "VERSION", 1)
    path = cache_dir() / f"{name}-v{version}-{_fingerprint(module)}" / "model.onnx"
    if not path.exists():
        save(module.build(), path)
    return path
