"""Quantization arithmetic in numpy, as ONNX's QuantizeLinear / DequantizeLinear define it.

Weights: symmetric integer codes per output channel (one scale per row of W [N, K]) or per block
of ``block`` consecutive input columns, each group's scale chosen among clip ratios CLIP_GRID of
its absolute maximum by least squared error (the error of round-to-nearest, or under GPTQ the
compensated error, see ``SymmetricQuantizer``). Activations: one scale per tensor, uint8 with a
zero point (asymmetric) or int8 symmetric. These functions are also effc's reference of the
quantized model: ``fake_quant`` and ``linear_reference`` compute what the exported QDQ graph
means.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # int8: 127, int4: 7 (-128 / -8 stay unused: symmetric)


@dataclass
class ActParams:
    """Per-tensor activation quantization: x_q = saturate(round(x / scale) + zero_point)."""

    scale: float
    zero_point: int
    signed: bool      # int8 symmetric (zero_point 0) or uint8 asymmetric
    clip_ratio: float  # chosen range / observed min-max range

    @property
    def qmin(self) -> int:
        return -128 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 127 if self.signed else 255

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.signed else np.uint8)


def act_params(lo: float, hi: float, signed: bool, observed: tuple[float, float] | None = None) -> ActParams:
    """Scale and zero point covering [lo, hi] (which contains 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signed:
        peak = max(-lo, hi)
        scale, zp = (peak / 127.0 if peak > 0 else 1.0), 0
    else:
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zp = int(np.clip(np.round(-lo / scale), 0, 255))
    scale = float(np.float32(scale))
    seen = observed or (lo, hi)
    width = (seen[1] - seen[0]) if not signed else max(-seen[0], seen[1])
    chosen = (hi - lo) if not signed else max(-lo, hi)
    return ActParams(scale, zp, signed, float(chosen / width) if width > 0 else 1.0)


def quantize_act(x: np.ndarray, p: ActParams) -> np.ndarray:
    """QuantizeLinear (round half to even, saturate), in float32 as ONNX Runtime computes it."""
    q = np.round(np.asarray(x, np.float32) / np.float32(p.scale)) + p.zero_point
    return np.clip(q, p.qmin, p.qmax).astype(p.dtype)


def fake_quant(x: np.ndarray, p: ActParams) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x))."""
    return ((quantize_act(x, p).astype(np.float32) - np.float32(p.zero_point)) * np.float32(p.scale)).astype(np.float32)


def dynamic_params(x: np.ndarray) -> ActParams:
    """DynamicQuantizeLinear's run-time uint8 parameters of the whole tensor ``x``."""
    x = np.asarray(x, np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / np.float32(255.0)) if hi > lo else np.float32(0.0)
    zp = int(np.clip(np.round((0.0 - lo) / scale), 0, 255)) if scale > 0 else 0
    return ActParams(float(scale) if scale > 0 else 1.0, zp, False, 1.0)


class SymmetricQuantizer:
    """Symmetric ``bits``-bit codes for W [N, K], one scale per row and group of ``group`` input
    columns (group = K: per output channel); drives ``effc.passes._gptq.gptq``. Each group's scale
    is the clip ratio of CLIP_GRID times its absolute maximum / qmax that gives the least squared
    error on the columns it is fitted on."""

    def __init__(self, rows: int, cols: int, bits: int, group: int, clip: bool = True):
        self.bits, self.group, self.qmax = bits, group, weight_qmax(bits)
        self.grid = CLIP_GRID if clip else (1.0,)
        self.scale = np.ones((cols // group, rows))
        self.ratio = np.ones((cols // group, rows))
        self.codes = np.zeros((rows, cols), np.int8)

    def fit(self, index: int, w: np.ndarray) -> None:
        peak = np.abs(w).max(axis=1)
        best = np.full(len(peak), np.inf)
        for ratio in self.grid:
            scale = np.where(peak > 0, peak * ratio / self.qmax, 1.0)
            err = ((np.clip(np.round(w / scale[:, None]), -self.qmax, self.qmax) * scale[:, None] - w) ** 2).sum(axis=1)
            better = err < best
            best = np.where(better, err, best)
            self.scale[index] = np.where(better, scale, self.scale[index])
            self.ratio[index] = np.where(better, ratio, self.ratio[index])
        self.scale[index] = self.scale[index].astype(np.float32)  # what the model stores

    def column(self, j: int, w: np.ndarray) -> np.ndarray:
        s = self.scale[j // self.group]
        q = np.clip(np.round(w / s), -self.qmax - 1, self.qmax)  # compensation may reach -2^(b-1)
        self.codes[:, j] = q
        return q * s

    def round_to_nearest(self, w: np.ndarray) -> np.ndarray:
        out = np.empty_like(w, dtype=np.float64)
        for g in range(w.shape[1] // self.group):
            cols = slice(g * self.group, (g + 1) * self.group)
            self.fit(g, w[:, cols])
            for j in range(cols.start, cols.stop):
                out[:, j] = self.column(j, w[:, j])
        return out

    def scales(self) -> np.ndarray:
        """float32 scales [K / group, N] (per channel: [1, N])."""
        return self.scale.astype(np.float32)


@dataclass
class QuantWeight:
    """A quantized weight W [N, K] = codes * scale (scale per row and group of input columns)."""

    codes: np.ndarray   # int8 [N, K] (int4 values in -8..7 for 4 bits)
    scale: np.ndarray   # float32 [K / group, N]
    bits: int
    group: int          # K for per output channel
    clip_ratio: float   # mean chosen clip ratio
    error: float        # relative output error under H (weight error without H)

    def dense(self) -> np.ndarray:
        """The float32 weight [N, K] the codes stand for (DequantizeLinear's result)."""
        s = np.repeat(self.scale, self.group, axis=0).T  # [N, K]
        return (self.codes.astype(np.float32) * s).astype(np.float32)

    @functools.cached_property
    def dense_t64(self) -> np.ndarray:
        """dense().T in float64 ([K, N]), kept: the reference multiplies by it once per sample."""
        return np.ascontiguousarray(self.dense().T.astype(np.float64))


def quantize_weight(w: np.ndarray, h: np.ndarray | None, bits: int, group: int, gptq: bool,
                    damp: float = 0.01, act_order: bool = False, clip: bool = True) -> QuantWeight:
    """Symmetric codes for W [N, K]: GPTQ-compensated under H when ``gptq`` and ``h`` are given,
    else round to nearest."""
    from effc.calib import single_threaded_blas
    from effc.passes._gptq import gptq as run_gptq
    from effc.passes._gptq import output_error

    n, k = w.shape
    quantizer = SymmetricQuantizer(n, k, bits, group, clip)
    with single_threaded_blas():
        if gptq and h is not None:
            dense = run_gptq(w, h, quantizer, group, max(128, group), damp, act_order)
        else:
            dense = quantizer.round_to_nearest(w.astype(np.float64))
        error = output_error(w, dense, h)
    return QuantWeight(quantizer.codes, quantizer.scales(), bits, group, float(quantizer.ratio.mean()), error)


def linear_reference(x: np.ndarray, weight: QuantWeight, bias: np.ndarray | None, act: ActParams | None,
                     dynamic: bool = False) -> np.ndarray:
    """What one quantized linear computes: y = Xq @ Wq^T + b, with Xq the activation after
    QuantizeLinear -> DequantizeLinear (static ``act``), DynamicQuantizeLinear (``dynamic``)
    or x itself (weight-only). The bias of a static layer is the int32 one it stores."""
    x = np.asarray(x, np.float32)
    if dynamic:
        act = dynamic_params(x)
    xq = fake_quant(x, act) if act is not None else x
    y = (xq.astype(np.float64) @ weight.dense_t64).astype(np.float32)
    if bias is not None:
        if act is not None and not dynamic:
            bias = dequantized_bias(bias, act, weight)
        y = y + bias.astype(np.float32)
    return y


def bias_codes(bias: np.ndarray, act: ActParams, weight: QuantWeight) -> np.ndarray | None:
    """int32 bias codes at scale s_x * s_w (per output channel), or None if they would overflow."""
    scale = bias_scale(act, weight)
    codes = np.round(bias.astype(np.float64) / scale)
    if np.any(np.abs(codes) > 2 ** 31 - 1):
        return None
    return codes.astype(np.int32)


def bias_scale(act: ActParams, weight: QuantWeight) -> np.ndarray:
    return (np.float32(act.scale) * weight.scale[0]).astype(np.float32)


def dequantized_bias(bias: np.ndarray, act: ActParams, weight: QuantWeight) -> np.ndarray:
    codes = bias_codes(bias, act, weight)
    if codes is None:
        return bias.astype(np.float32)
    return (codes.astype(np.float32) * bias_scale(act, weight)).astype(np.float32)
