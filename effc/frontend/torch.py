"""PyTorch front-end: nn.Module or torch.export program -> ONNX (torch's exporter) -> onnx_ir."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any, Sequence

import onnx_ir as ir

from effc.errors import EffcError

DEFAULT_OPSET = 23


def from_torch(module: Any, example_inputs: Sequence[Any], opset: int = DEFAULT_OPSET,
               input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
               dynamic_shapes: Any = None) -> ir.Model:
    """Export ``module(*example_inputs)`` with torch.export + torch's ONNX exporter.

    The module is put in eval mode; the exporter's chatter is kept off the terminal.
    """
    import torch

    if isinstance(module, torch.nn.Module):
        module = module.eval()
    with quiet_exporter():
        try:
            program = torch.onnx.export(module, tuple(example_inputs), dynamo=True, opset_version=opset,
                                        input_names=list(input_names) if input_names else None,
                                        output_names=list(output_names) if output_names else None,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
        except Exception as exc:
            raise EffcError(f"torch export failed: {str(exc).strip().splitlines()[0][:200]}") from None
    model = program.model
    model.ir_version = min(model.ir_version, 10)
    return _normalise(model)


def load_pt2(path: str | os.PathLike, opset: int | None = None) -> ir.Model:
    """Load a ``torch.export.save`` archive and export it to ONNX."""
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise EffcError(f"{path}: not a torch.export archive ({str(exc).strip().splitlines()[0][:200]})") from None
    with quiet_exporter():
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset or DEFAULT_OPSET, verbose=False)
        except Exception as exc:
            raise EffcError(f"{path}: torch export failed ({str(exc).strip().splitlines()[0][:200]})") from None
    return _normalise(onnx_program.model)


def _normalise(model: ir.Model) -> ir.Model:
    # Round-trip through the ONNX front-end so torch models get the same checks and shapes.
    from effc.frontend.onnx import from_proto

    proto = ir.serde.serialize_model(model)
    proto.ir_version = min(proto.ir_version, 10)
    return from_proto(proto, origin="torch module")


@contextlib.contextmanager
def quiet_exporter():
    import logging

    # torch's exporter and onnxscript's constant folder both narrate; users want one clean line.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)
