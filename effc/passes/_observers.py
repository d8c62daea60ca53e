"""Streamed activation statistics for quantization: ranges with memory independent of the sample count.

Each observed value keeps a fixed-size state: its running min and max, its per-channel absolute
maximum (SmoothQuant's statistic) and a histogram of BINS bins over [-R, R]. When a sample
exceeds R, R doubles (as often as needed) and the histogram is re-binned exactly: with an even
number of bins symmetric about 0, doubling merges neighbouring pairs into the middle half. So
peak memory per value is BINS counts + 3 channel vectors, whatever the number of samples
(ONNX Runtime's histogram calibrator keeps every sample's values: issue #10503).

Ranges from the state: ``minmax`` (the observed extremes), ``percentile`` (the ``percentile``
and 100 - ``percentile`` quantiles of the histogram) and ``entropy`` (TensorRT's KL
divergence threshold on |x|, for 128 levels a side). Every range contains 0 (zero must be
exactly representable: padding, ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from effc.calib import Feeds, row_mask, stream_values, token_rows
from effc.errors import EffcError

BINS = 2048  # even, so the histogram is symmetric about 0
METHODS = ("minmax", "percentile", "entropy")


@dataclass
class Observer:
    """Fixed-size statistics of one value's rows (last axis = channels)."""

    channels: int
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    bound: float = 0.0  # the histogram covers [-bound, bound]
    lo: float = 0.0
    hi: float = 0.0
    channel_absmax: np.ndarray | None = None
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    rows: int = 0

    def __post_init__(self):
        self.channel_absmax = np.zeros(self.channels)
        self.channel_min = np.zeros(self.channels)
        self.channel_max = np.zeros(self.channels)

    @property
    def nbytes(self) -> int:
        """The state's size: what calibration keeps per value (the bound on its memory)."""
        return int(self.hist.nbytes + 3 * self.channel_absmax.nbytes + 8 * 4)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        self.rows += x.shape[0]
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        np.maximum(self.channel_absmax, np.abs(x).max(axis=0), out=self.channel_absmax)
        np.minimum(self.channel_min, x.min(axis=0), out=self.channel_min)
        np.maximum(self.channel_max, x.max(axis=0), out=self.channel_max)
        peak = max(-self.lo, self.hi)
        if not np.isfinite(peak):
            raise EffcError("an activation is not finite (inf or nan) on the calibration data: it cannot be quantized")
        if peak <= 0:
            self.hist[BINS // 2] += x.size  # all zeros so far
            return
        if self.bound == 0.0:
            self.bound = peak
        while peak > self.bound:
            self._double()
        counts, _ = np.histogram(x, bins=BINS, range=(-self.bound, self.bound))
        self.hist += counts

    def _double(self) -> None:
        """Re-bin onto [-2R, 2R]: pairs of neighbours merge into the middle half (exact)."""
        merged = self.hist.reshape(-1, 2).sum(axis=1)
        self.hist = np.zeros(BINS, np.int64)
        self.hist[BINS // 4: BINS // 4 + BINS // 2] = merged
        self.bound *= 2.0

    # --- ranges -------------------------------------------------------------------------------

    def range(self, method: str, percentile: float = 99.999) -> tuple[float, float]:
        """(lo, hi) to quantize this value over, always containing 0."""
        if method == "minmax" or self.bound == 0.0:
            return min(self.lo, 0.0), max(self.hi, 0.0)
        edges = np.linspace(-self.bound, self.bound, BINS + 1)
        if method == "percentile":
            cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
            tail = (100.0 - percentile) / 100.0
            lo = edges[int(np.searchsorted(cdf, tail, side="left"))]
            hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, BINS)]
            return max(min(lo, 0.0), self.lo), min(max(hi, 0.0), self.hi)
        if method == "entropy":
            t = self.entropy_threshold()
            return max(-t, min(self.lo, 0.0)), min(t, max(self.hi, 0.0))
        raise ValueError(method)

    def entropy_threshold(self, levels: int = 128) -> float:
        """|x| threshold minimising KL(P || Q): P the |x| histogram clipped at the threshold (the
        tail added to its last bin), Q that histogram spread over ``levels`` equal buckets."""
        half = BINS // 2
        mags = self.hist[half:] + self.hist[:half][::-1]  # |x| histogram, bin width bound / half
        total = mags.sum()
        if total == 0:
            return self.bound
        best, best_i = np.inf, half
        for i in range(levels, half + 1, max(1, half // 256)):
            p = mags[:i].astype(np.float64).copy()
            p[-1] += mags[i:].sum()
            bucket = np.arange(i) * levels // i
            part = mags[:i].astype(np.float64)
            nonzero = part > 0
            sums = np.bincount(bucket, weights=part, minlength=levels)
            counts = np.bincount(bucket, weights=nonzero, minlength=levels)
            q = np.where(nonzero, sums[bucket] / np.maximum(counts[bucket], 1), 0.0)
            mask = p > 0
            if not np.all(q[mask] > 0):
                continue
            ps, qs = p[mask] / p.sum(), q[mask] / q[mask].sum()
            kl = float(np.sum(ps * np.log(ps / qs)))
            if kl < best:
                best, best_i = kl, i
        return best_i * self.bound / half


def observe(model: ir.Model, feeds: Feeds, names: list[str], progress: bool = True) -> dict[str, Observer]:
    """An Observer per named value, streamed over ``feeds`` (one ONNX Runtime run per sample,
    the values as extra outputs; rows at padded positions left out, as in effc.calib)."""
    observers: dict[str, Observer] = {}
    for feed, values in stream_values(model, feeds, names, progress):
        mask = row_mask(feed)
        for name, x in values.items():
            x = token_rows(x, mask)
            if name not in observers:
                observers[name] = Observer(x.shape[1])
            observers[name].update(x)
    return observers
