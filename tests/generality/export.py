"""Export a generality architecture the way a user would: torch.onnx.export with its defaults
(dynamo exporter, optimize=True) at opset 23, where transformers' default sdpa attention becomes
the ONNX Attention op (at torch's default opset 20 it is decomposed instead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effc.frontend.torch import quiet_exporter
from tests.generality.architectures import build

OPSET = 23
OUTPUT = "output"


def export(name: str, attn: str, batch: int, path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """Write the ONNX file of (name, attn, batch) to ``path``; returns (path, feed, torch output)."""
    import torch

    module, feed = build(name, attn, batch)
    args = tuple(torch.from_numpy(v) for v in feed.values())
    with torch.inference_mode():
        expected = module(*args).float().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporter():
        program = torch.onnx.export(module, args, opset_version=OPSET, input_names=list(feed),
                                    output_names=[OUTPUT])
    program.save(str(path))
    return path, feed, expected
