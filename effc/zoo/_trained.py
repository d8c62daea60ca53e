"""Loading the committed weights of the zoo models trained here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from effc.errors import EffcError


def trained_module(new_module: Callable[[], Any], weights: Path, script: str) -> Any:
    """``new_module()`` with ``weights`` loaded, in eval mode; a clear error names the training
    script when the weights file is missing."""
    from safetensors.torch import load_file

    if not weights.exists():
        raise EffcError(f"weights missing at {weights} (run {script})")
    module = new_module()
    module.load_state_dict(load_file(str(weights)))
    return module.eval()
