"""Uniform asymmetric integer codes per (row, group of input columns): the GPTQ baseline.

Each group stores one fp16 scale and a q-bit zero point per row, so its storage is
q + (16 + q) / group bits per weight.
"""

from __future__ import annotations

import numpy as np

SCALE_BITS = 16


class UniformQuantizer:
    def __init__(self, rows: int, cols: int, q: int, group: int):
        self.q, self.group = q, group
        self.scale = np.ones((cols // group, rows))
        self.zero = np.zeros((cols // group, rows))

    def fit(self, index: int, w: np.ndarray) -> None:
        lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        scale = (hi - lo) / (2 ** self.q - 1)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float16).astype(np.float64)
        self.scale[index], self.zero[index] = scale, np.round(-lo / scale)

    def column(self, j: int, w: np.ndarray) -> np.ndarray:
        s, z = self.scale[j // self.group], self.zero[j // self.group]
        return (np.clip(np.round(w / s) + z, 0, 2 ** self.q - 1) - z) * s

    def bits_per_weight(self) -> float:
        return self.q + (SCALE_BITS + self.q) / self.group
