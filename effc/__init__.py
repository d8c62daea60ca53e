"""effc: a graph-rewriting compiler that makes trained transformers cheaper to run."""

from effc.errors import EffcError
from effc.frontend.onnx import load
from effc.frontend.torch import from_torch
from effc.ir import save

__all__ = ["EffcError", "load", "from_torch", "save"]
__version__ = "0.1.0"
