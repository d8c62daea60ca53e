"""Layout steps shared by the CPU lookup-table kernels for effc.ShiftAddMatMul."""

from __future__ import annotations

import numpy as np

from effc.ops.shift_add_matmul import EXPONENT_BIAS

FLOAT_EXP_BIAS = 127


def fold_signs(planes: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Op layout (planes [q, N, K/8], codes [q, N, K/g, 1]) -> (bytes [q, N, K/8], float32 exponent
    fields [q, N, K/g] uint8, group g).

    A negative scale is folded into its group's bytes: inverting every bit flips every +-1, so all
    scales become non-negative. Each scale becomes the exponent field of its float32 (|code| + 63);
    code 0 ("no term") stays 0, which shifted into place is +0.0, so kernels need no decode branch.
    """
    kb = planes.shape[2]
    groups, terms = codes.shape[2], codes.shape[3]
    if terms != 1 or (kb * 8) % groups or (kb * 8 // groups) % 8:
        raise ValueError(f"kernel needs one term per scale and groups of whole bytes (got terms={terms}, "
                         f"group={kb * 8 / groups:g})")
    code = codes[..., 0].astype(np.int16)
    negative = np.repeat(code < 0, kb // groups, axis=2)
    magnitude = np.abs(code)
    field = np.where(magnitude > 0, magnitude + (FLOAT_EXP_BIAS - EXPONENT_BIAS), 0).astype(np.uint8)
    return np.where(negative, ~planes, planes).astype(np.uint8), field, kb * 8 // groups
