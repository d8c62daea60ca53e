"""Evaluate weight-only computations once, at compile time, before any kernel is formed.

A model often reaches its weights through ops (GPT-2's tied LM head is `Transpose(wte)`; passes
add reshapes and scalings of weights). Left in the graph, such a kernel runs on every call, and the
matmul that consumes it sees a computed operand instead of a weight, so it cannot pre-pack it.
Relax's LiftTransformParams separates those computations into a function of the weights alone;
effc runs it here on the host and ships its results as the parameters.
"""

from __future__ import annotations

import numpy as np

from effc.codegen.lower import TRANSFORM, split_transform


def fold_weight_transforms(mod, params: list[np.ndarray], host_target):
    """(module whose main takes the transformed weights, their values)."""
    import tvm
    from tvm import relax

    if not params:
        return mod, params
    lifted = relax.transform.LiftTransformParams()(mod)
    main, prep = split_transform(lifted)
    if prep is None:
        return mod, params
    exe = tvm.compile(prep, target=host_target)  # a one-off, unscheduled run is fine
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm[TRANSFORM]([tvm.runtime.tensor(p) for p in params])
    values = [out.numpy()] if hasattr(out, "numpy") else [t.numpy() for t in out]
    return main, values
