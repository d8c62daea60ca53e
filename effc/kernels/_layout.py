"""Layout steps and pieces shared by the lookup-table kernels (CPU and CUDA) for effc.ShiftAddMatMul."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ops.shift_add_matmul import EXPONENT_BIAS

FLOAT_EXP_BIAS = 127


def misfit(planes_shape: tuple, codes_shape: tuple) -> str | None:
    """Why a weight (planes [q, N, K/8], codes [q, N, K/g, T]) breaks what every kernel needs (one
    power-of-two term per scale, groups of whole bytes), or None."""
    kb, groups, terms = planes_shape[2], codes_shape[2], codes_shape[3]
    if terms != 1:
        return f"{terms} power-of-two terms per scale (the kernels take 1)"
    if (kb * 8) % groups or (kb * 8 // groups) % 8:
        return f"group {kb * 8 / groups:g} is not a whole number of bytes"
    return None


def fold_signs(planes: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Op layout (planes [q, N, K/8], codes [q, N, K/g, 1]) -> (bytes [q, N, K/8], float32 exponent
    fields [q, N, K/g] uint8, group g).

    A negative scale is folded into its group's bytes: inverting every bit flips every +-1, so all
    scales become non-negative. Each scale becomes the exponent field of its float32 (|code| + 63);
    code 0 ("no term") stays 0, which shifted into place is +0.0, so kernels need no decode branch.
    """
    reason = misfit(planes.shape, codes.shape)
    if reason:
        raise ValueError(f"kernel needs one term per scale and groups of whole bytes ({reason})")
    kb, groups = planes.shape[2], codes.shape[2]
    code = codes[..., 0].astype(np.int16)
    negative = np.repeat(code < 0, kb // groups, axis=2)
    magnitude = np.abs(code)
    field = np.where(magnitude > 0, magnitude + (FLOAT_EXP_BIAS - EXPONENT_BIAS), 0).astype(np.uint8)
    return np.where(negative, ~planes, planes).astype(np.uint8), field, kb * 8 // groups


def table_entry(x, row, first, k: int, u):
    """TIR expression: entry ``u`` of the 16-entry table of X[row, first:first + 4], i.e.
    sum_t (+x if bit t of u else -x), with X read as 0 past column k (K padded to whole words)."""
    from tvm import tirx

    total = None
    for t in range(4):
        value = tirx.if_then_else(first + t < k, x[row, tirx.Min(first + t, k - 1)], tirx.const(0.0, "float32"))
        term = tirx.Select((u & (1 << t)) == (1 << t), value, -value)
        total = term if total is None else total + term
    return total


def dtype_misfit(node: ir.Node) -> str | None:
    """Why a node's X and bias do not suit the kernels (they take float32), or None."""
    x, bias = node.inputs[0], node.inputs[3]
    if x.dtype != ir.DataType.FLOAT or bias.dtype != ir.DataType.FLOAT:
        return f"kernels take float32 X and bias (got {x.dtype}, {bias.dtype})"
    return None


def rows_of_x(shapes: list) -> int:
    """M: the rows of X [..., K] (the node's first input) that the kernel sees as [M, K]."""
    return int(np.prod(shapes[0][:-1]))


def call_rows(bb, gv, kernel, inputs: list, weights: list):
    """Emit the kernel call for X [..., K] and bias: X reshaped to [M, K] and padded with zero rows
    to the kernel's row count, Y [rows, N] sliced back to [..., N]."""
    from tvm import relax

    x, bias = inputs
    shape = [int(d) for d in x.ty.shape]
    rows, k = (int(d) for d in kernel.func.params[0].shape)  # TVM 0.27: a parameter is its buffer
    n = int(kernel.func.params[-1].shape[1])
    if shape[-1] != k:
        raise EffcError(f"X has K={shape[-1]}, the weight {k}")
    m = int(np.prod(shape[:-1]))
    x = bb.emit(relax.op.reshape(x, [m, k])) if len(shape) != 2 else x
    if rows > m:
        x = bb.emit(relax.op.nn.pad(x, [0, rows - m, 0, 0]))
    y = bb.emit(relax.call_tir(gv, [x, *weights, bias], relax.TensorType([rows, n], "float32")))
    if rows > m:
        y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))
    return relax.op.reshape(y, [*shape[:-1], n]) if len(shape) != 2 else y
