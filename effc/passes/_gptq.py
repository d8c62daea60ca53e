"""GPTQ's column-by-column quantization with error compensation, for any group quantizer.

W [N, K] (rows = outputs, columns = inputs) is quantized one input column at a time; each
column's rounding error, divided by the matching diagonal of the Cholesky factor of H^-1, is
pushed into the not-yet-quantized columns (H = 2 X^T X / n from calibration activations).
With H = I this is exactly independent rounding (round-to-nearest).
The quantizer sees columns in groups of ``group`` consecutive inputs (the scale layout); with
activation order its groups are fitted up front on the original weights ("static groups"),
since the packed layout needs groups of consecutive columns.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class GroupQuantizer(Protocol):
    """What ``gptq`` drives. A quantizer may also define ``weigh(costs)``: it is called once,
    before any ``fit``, with each input column's cost per unit of squared weight error once
    compensation has run, 1 / [chol(H^-1)]_jj^2 (original column order; 0 for dead inputs)."""

    def fit(self, index: int, w: np.ndarray) -> None:
        """Choose the parameters of group ``index`` from its current columns ``w`` [N, group]."""

    def column(self, j: int, w: np.ndarray) -> np.ndarray:
        """Quantize input column ``j`` ([N]) with its group's parameters; return the dequantized column."""


def hessian_inverse_factor(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damping until it is definite."""
    h = h.astype(np.float64).copy()
    mean = float(np.mean(np.diag(h))) or 1.0
    for extra in (1, 10, 100, 1000):
        try:
            damped = h + np.eye(len(h)) * damp * extra * mean
            inverse = np.linalg.inv(np.linalg.cholesky(damped))
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("H is not positive definite even with 1000x damping")


def gptq(w: np.ndarray, h: np.ndarray | None, quantizer: GroupQuantizer, group: int, block: int = 128,
         damp: float = 0.01, act_order: bool = False) -> np.ndarray:
    """Quantize ``w`` [N, K]; returns the dequantized [N, K] (the quantizer keeps the codes)."""
    w = w.astype(np.float64).copy()
    n, k = w.shape
    if h is None:
        h = np.eye(k)
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # an input that is always zero: its weight never matters
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    hinv = hessian_inverse_factor(h[perm][:, perm], damp)
    if hasattr(quantizer, "weigh"):
        costs = np.empty(k)
        costs[perm] = 1.0 / np.diag(hinv) ** 2
        costs[dead] = 0.0
        quantizer.weigh(costs)
    if act_order:
        for g in range(k // group):
            quantizer.fit(g, w[:, g * group:(g + 1) * group])
        w = w[:, perm]
    block = max(group, block // group * group)
    out = np.zeros_like(w)
    for start in range(0, k, block):
        stop = min(start + block, k)
        w1, err1 = w[:, start:stop].copy(), np.zeros((n, stop - start))
        hinv1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            j = start + i
            if not act_order and j % group == 0:
                quantizer.fit(j // group, w1[:, i:i + group])
            qcol = quantizer.column(int(perm[j]), w1[:, i])
            out[:, j] = qcol
            err = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            err1[:, i] = err
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(k)
    return out[:, inverse]


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray | None) -> float:
    """Relative output error tr(dW H dW^T) / tr(W H W^T) (plain relative weight error if no H)."""
    d = (w - q).astype(np.float64)
    w = w.astype(np.float64)
    if h is None:
        return float((d ** 2).sum() / max((w ** 2).sum(), 1e-300))
    return float(((d @ h) * d).sum() / max(((w @ h) * w).sum(), 1e-300))
