"""Export a generality architecture the way a user would: torch.onnx.export with its defaults
(dynamo exporter, optimize=True) at opset 23, where transformers' default sdpa attention becomes
the ONNX Attention op (at torch's default opset 20 it is decomposed instead)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

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
    with _quiet():
        program = torch.onnx.export(module, args, opset_version=OPSET, input_names=list(feed),
                                    output_names=[OUTPUT])
    program.save(str(path))
    return path, feed, expected


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
