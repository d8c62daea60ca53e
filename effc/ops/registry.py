"""The registry of effc ops: for each, in one registration, everything codegen needs to lower it.

An op is registered once (at the end of its file in effc/ops/) with its ONNX function (the
reference semantics, which ONNX Runtime runs and which codegen compiles as a fallback), the inputs
that are packed at compile time, and per target kind (``llvm``, ``cuda``) a :class:`TargetKernels`:
a fit test giving the reason a node cannot take the kernel (None: it can), and the kernel builder,
which picks the hand-written PrimFunc (effc/kernels/) for the node's shapes and packs its constant
inputs into that kernel's layout. effc.codegen.custom_ops lowers every registered op the same way.

This module imports neither TVM nor codegen, so passes may import the ops that register here.
Every module of the effc.ops package is imported on first look-up, so a new op needs no other
edit: a file in effc/ops/ that calls :func:`register`, and its kernels in effc/kernels/.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Kernel:
    """The kernel one node is lowered to: ``func(*inputs, *weights, out)`` as a call_tir, where
    inputs are the node's non-packed inputs (in order, unless the op's ``call`` arranges them) and
    weights its packed constants."""

    name: str  # the kernel's family ("shift_add_prefill"): what the manifest's entry starts with
    symbol: str  # the PrimFunc's name, one per distinct shape (nodes of one shape share the kernel);
    #   the built module may append digits to it, so end it with "_" to keep it readable
    func: object  # the hand-written tvm PrimFunc
    weights: tuple[np.ndarray, ...]  # the node's constant inputs, packed into the kernel's layout


@dataclass(frozen=True)
class TargetKernels:
    """How an op is lowered for one target kind.

    ``fit(node, constants, target)``: why the node cannot use the kernels here (a short reason,
    recorded in the manifest; the node then runs its function body), or None. ``constants`` are the
    values of the op's packed inputs (all constant by then); ``target`` a tvm Target.
    ``build(shapes, constants)``: the Kernel for the static shapes of the node's non-packed inputs,
    with ``constants`` packed into its layout.
    ``call(bb, gv, kernel, inputs, weights)``: emits the call (a relax expression) where the kernel
    wants its arguments reshaped or padded; None: ``call_tir(gv, [*inputs, *weights])`` whose output
    is the PrimFunc's last buffer.
    ``context``: build is ``build(shapes, constants, attributes, target)``, for kernels chosen by the
    node's attributes (a dict of their values) or by the target's features as well as by shape.
    """

    fit: Callable[..., str | None]
    build: Callable[..., Kernel]
    call: Callable | None = None
    context: bool = False


@dataclass(frozen=True, eq=False)  # one object per op: compared and hashed by identity
class CustomOp:
    domain: str
    name: str
    function: Callable[[int], object]  # opset -> the op's ir.Function (reference semantics)
    packed: tuple[int, ...]  # input positions packed at compile time (they must be constants)
    targets: dict[str, TargetKernels | str] = field(default_factory=dict)  # kind -> kernels, or
    #   "module:attribute" naming them (imported only when a model uses the op on that target)
    rule: str = ""  # label of the kernels in the manifest and in profiles ("shift-add-lut")
    fallback: str = "function"  # label of a node that runs its function body instead
    check: Callable | None = None  # (name, node, constants) -> None; EffcError for a malformed node

    def kernels(self, kind: str) -> TargetKernels | None:
        entry = self.targets.get(kind)
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
        return entry


_OPS: dict[tuple[str, str], CustomOp] = {}
_loaded = False


def register(op: CustomOp) -> CustomOp:
    """Register ``op`` (once per (domain, name); ValueError on a second, different registration)."""
    key = (op.domain, op.name)
    if key in _OPS and _OPS[key] is not op:
        raise ValueError(f"{op.domain}.{op.name} is registered already")
    _OPS[key] = op
    return op


def unregister(domain: str, name: str) -> None:
    _OPS.pop((domain, name), None)


def lookup(domain: str, name: str) -> CustomOp | None:
    """The registered op (domain, name), or None."""
    _load_builtin_ops()
    return _OPS.get((domain, name))


def registered() -> list[CustomOp]:
    _load_builtin_ops()
    return list(_OPS.values())


def _load_builtin_ops() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import effc.ops

    for info in pkgutil.iter_modules(effc.ops.__path__):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"effc.ops.{info.name}")
