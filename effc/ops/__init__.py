"""effc custom ops: each is an ONNX function in domain ``effc`` (reference semantics in standard
ops, so ONNX Runtime runs an exported model unchanged) plus a numpy reference and a shape rule.

A pass that emits an op calls :func:`use` so the model carries the op's function and imports
the domain; codegen recognises the op by (domain, name) and lowers it to its own kernel.
"""

from __future__ import annotations

import onnx_ir as ir

DOMAIN = "effc"
DOMAIN_VERSION = 1


def use(model: ir.Model, function: ir.Function) -> None:
    """Make ``model`` carry ``function`` (once) and import the effc domain."""
    model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    model.functions.setdefault(function.identifier(), function)
