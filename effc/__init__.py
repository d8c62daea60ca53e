"""effc: a graph-rewriting compiler that makes trained transformers cheaper to run."""

from effc.errors import EffcError

__all__ = ["EffcError", "load", "from_torch", "save"]
__version__ = "0.1.0"

# Imported on first use, so that `effc --help` and the CLI's argument checks do not pay for onnx/torch.
_LAZY = {"load": ("effc.frontend.onnx", "load"), "from_torch": ("effc.frontend.torch", "from_torch"),
         "save": ("effc.ir", "save")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'effc' has no attribute {name!r}")
