"""Binary-coding quantization (BCQ) of weight groups: w ~= sum_i alpha_i b_i, b_i in {-1, +1}.

Scales are rounded to (sums of up to ``terms``) signed powers of two, as ShiftAddLLM does, so
that scaling is a shift. A group is fitted by a greedy start and alternating refinement
(least-squares scales -> power-of-two rounding -> nearest codes), keeping each row's best.
Everything here works on many rows at once: ``w`` is [R, m] (R rows, m columns of one group).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from effc.ops.shift_add_matmul import MAX_EXPONENT, MIN_EXPONENT


@lru_cache(maxsize=None)
def sign_combos(q: int) -> np.ndarray:
    """[2^q, q] all +-1 code vectors."""
    idx = np.arange(2 ** q)[:, None] >> np.arange(q)[None, :]
    return (idx & 1) * 2.0 - 1.0


def round_pow2(values: np.ndarray, terms: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each value as a sum of ``terms`` signed powers of two, greedily on the residual.

    Returns (signs, exponents), each of shape values.shape + (terms,); sign 0 marks an unused
    term. Each term is the power of two nearest (linearly) to the remaining residual.
    """
    residual = np.asarray(values, dtype=np.float64).copy()
    signs = np.zeros(residual.shape + (terms,))
    exps = np.zeros(residual.shape + (terms,), dtype=np.int64)
    for t in range(terms):
        mag = np.abs(residual)
        live = mag > 2.0 ** (MIN_EXPONENT - 1)
        lo = np.floor(np.log2(np.where(live, mag, 1.0)))
        e = np.where(mag - 2.0 ** lo > 2.0 ** (lo + 1) - mag, lo + 1, lo)
        e = np.clip(e, MIN_EXPONENT, MAX_EXPONENT).astype(np.int64)
        s = np.where(live, np.sign(residual), 0.0)
        signs[..., t], exps[..., t] = s, np.where(live, e, 0)
        residual = residual - s * np.exp2(e)
    return signs, exps


def pow2_value(signs: np.ndarray, exps: np.ndarray) -> np.ndarray:
    return (signs * np.exp2(exps)).sum(axis=-1)


def nearest_codes(w: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """For w [R, m] and scales [R, q]: codes [R, m, q] whose weighted sum is nearest each w."""
    combos = sign_combos(alphas.shape[1])
    levels = alphas @ combos.T                                   # [R, 2^q]
    order = np.argsort(levels, axis=1)
    ranked = np.take_along_axis(levels, order, axis=1)
    midpoints = (ranked[:, 1:] + ranked[:, :-1]) * 0.5
    rank = (w[:, :, None] > midpoints[:, None, :]).sum(axis=2)  # [R, m] position among sorted levels
    return combos[np.take_along_axis(order, rank, axis=1)]


def greedy_scales(w: np.ndarray, q: int) -> np.ndarray:
    """The classic greedy start: b_i = sign(r), alpha_i = mean |r|, r -= alpha_i b_i."""
    residual = w.astype(np.float64).copy()
    alphas = np.empty((w.shape[0], q))
    for i in range(q):
        b = np.where(residual >= 0, 1.0, -1.0)
        alphas[:, i] = np.abs(residual).mean(axis=1)
        residual -= alphas[:, i:i + 1] * b
    return alphas


def least_squares_scales(w: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per row argmin_alpha ||w - B alpha||^2 with B = codes [R, m, q]; a tiny ridge keeps the
    q x q normal equations solvable when two planes coincide."""
    gram = codes.transpose(0, 2, 1) @ codes + 1e-9 * np.eye(codes.shape[2])
    return np.linalg.solve(gram, (codes.transpose(0, 2, 1) @ w[:, :, None]))[..., 0]


def best_single_pow2(w: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round each row's scales [R, q] to single powers of two jointly: of the 2^q floor/ceil
    exponent choices around the least-squares scales, keep the one with least error on w."""
    q = alphas.shape[1]
    mag = np.maximum(np.abs(alphas), 2.0 ** MIN_EXPONENT)
    lo = np.clip(np.floor(np.log2(mag)), MIN_EXPONENT, MAX_EXPONENT - 1).astype(np.int64)
    signs = np.where(alphas < 0, -1.0, 1.0)
    ups = (sign_combos(q) > 0).astype(np.int64)                      # [2^q, q] floor (0) or ceil (1)
    best_err, best_e = np.full(w.shape[0], np.inf), lo.copy()
    for up in ups:
        e = lo + up
        levels = (signs * np.exp2(e)) @ sign_combos(q).T                  # [R, 2^q]
        err = (np.abs(w[:, :, None] - levels[:, None, :]).min(axis=2) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best_e[better] = err[better], e[better]
    return signs[..., None], best_e[..., None]


@dataclass
class GroupFit:
    signs: np.ndarray  # [R, q, terms] power-of-two term signs of each scale
    exps: np.ndarray   # [R, q, terms] their exponents

    @property
    def alphas(self) -> np.ndarray:
        return pow2_value(self.signs, self.exps)


def fit_group(w: np.ndarray, q: int, terms: int = 1, iters: int = 20) -> GroupFit:
    """Power-of-two BCQ scales for each row of ``w`` [R, m], by alternating refinement
    (at most ``iters`` rounds; stops when no row improves)."""
    w = w.astype(np.float64)
    alphas = greedy_scales(w, q)
    best_err = np.full(w.shape[0], np.inf)
    best_s = np.zeros((w.shape[0], q, terms))
    best_e = np.zeros((w.shape[0], q, terms), dtype=np.int64)
    for _ in range(iters + 1):
        s, e = best_single_pow2(w, alphas) if terms == 1 else round_pow2(alphas, terms)
        rounded = pow2_value(s, e)
        codes = nearest_codes(w, rounded)
        err = ((w - (codes * rounded[:, None, :]).sum(axis=2)) ** 2).sum(axis=1)
        better = err < best_err * (1 - 1e-9)
        if not better.any():  # converged (typically after 2-3 rounds)
            break
        best_err[better], best_s[better], best_e[better] = err[better], s[better], e[better]
        alphas = least_squares_scales(w, codes)
    return GroupFit(best_s, best_e)


class BCQQuantizer:
    """GPTQ group quantizer for BCQ: fits a group's power-of-two scales, then codes each column
    to the nearest of its row's 2^q levels. Collects what the packed layout stores.

    With ``bound`` (the original weight [rows, cols]), compensated weights are clipped to the
    largest magnitude of their original row-group before fitting and coding. Error compensation
    can otherwise grow a weight far past anything the layer had (seen: 6.2 -> 16 in a MiniLM
    fc2) in an input direction the calibration set barely excites; unseen inputs that do excite
    it then break the model, although the calibration error looks small."""

    def __init__(self, rows: int, cols: int, q: int, group: int, terms: int = 1, iters: int = 20,
                 bound: np.ndarray | None = None):
        self.q, self.group, self.terms, self.iters = q, group, terms, iters
        self._bound = (None if bound is None else
                       np.abs(bound).reshape(rows, cols // group, group).max(axis=2).T.astype(np.float64))
        self.signs = np.zeros((q, rows, cols))                           # plane codes, +-1
        self.term_signs = np.zeros((q, rows, cols // group, terms))
        self.term_exps = np.zeros((q, rows, cols // group, terms), dtype=np.int64)
        self._alphas = np.zeros((cols // group, rows, q))

    def _clip(self, index: int, w: np.ndarray) -> np.ndarray:
        if self._bound is None:
            return w
        limit = self._bound[index].reshape((-1,) + (1,) * (w.ndim - 1))
        return np.clip(w, -limit, limit)

    def fit(self, index: int, w: np.ndarray) -> None:
        fit = fit_group(self._clip(index, w), self.q, self.terms, self.iters)
        self.term_signs[:, :, index] = fit.signs.transpose(1, 0, 2)
        self.term_exps[:, :, index] = fit.exps.transpose(1, 0, 2)
        self._alphas[index] = fit.alphas

    def column(self, j: int, w: np.ndarray) -> np.ndarray:
        alphas = self._alphas[j // self.group]
        codes = nearest_codes(self._clip(j // self.group, w)[:, None], alphas)[:, 0]  # [R, q]
        self.signs[:, :, j] = codes.T
        return (codes * alphas).sum(axis=1)

    def round_to_nearest(self, w: np.ndarray) -> np.ndarray:
        """All groups at once without error compensation (the RTN baseline); returns the dequantized [R, K]."""
        rows, cols = w.shape
        groups = cols // self.group
        fit = fit_group(w.reshape(rows * groups, self.group), self.q, self.terms, self.iters)
        shape = (rows, groups, self.q, self.terms)
        self.term_signs = fit.signs.reshape(shape).transpose(2, 0, 1, 3)
        self.term_exps = fit.exps.reshape(shape).transpose(2, 0, 1, 3)
        alphas = fit.alphas                                                   # [rows*groups, q]
        codes = nearest_codes(w.reshape(rows * groups, self.group), alphas)   # [rows*groups, g, q]
        self.signs = codes.reshape(rows, cols, self.q).transpose(2, 0, 1)
        return (codes * alphas[:, None, :]).sum(axis=2).reshape(rows, cols)


def refit_exponents(w: np.ndarray, h: np.ndarray, signs: np.ndarray, term_signs: np.ndarray,
                    term_exps: np.ndarray, limit: np.ndarray | None = None, sweeps: int = 2) -> int:
    """After compensation: move single-term exponents by +-1 where that lowers the layer's output
    error (W_hat - W) H (W_hat - W)^T; codes stay. Returns how many exponents moved.

    GPTQ fits each group's scales once, on weights that later columns of the same group still
    change, and its column-greedy choice never revisits them; coordinate descent on the exact
    objective only ever lowers it. ``signs`` [q, N, K] and ``term_exps`` [q, N, G, 1] (int, in
    place) are the quantizer's; ``h`` should be damped like GPTQ's. With ``limit`` [N, G], no move
    takes a group's largest weight magnitude past it (the clipping contract of BCQQuantizer).
    """
    q, n, k = signs.shape
    groups = term_exps.shape[2]
    g = k // groups
    alpha = term_signs[..., 0] * np.exp2(term_exps[..., 0])                      # [q, N, G]
    dense = (signs.reshape(q, n, groups, g) * alpha[..., None]).sum(axis=0).reshape(n, k)
    resid = (dense - w) @ h                                                      # gradient / 2
    moved = 0
    for _ in range(sweeps):
        before = moved
        for gi in range(groups):
            cols = slice(gi * g, (gi + 1) * g)
            hgg = h[cols, cols]
            for i in range(q):
                b = signs[i, :, cols]                                            # [N, g]
                best_gain, best_step = np.zeros(n), np.zeros(n, dtype=np.int64)
                for step in (-1, 1):
                    e = term_exps[i, :, gi, 0] + step
                    ok = (term_signs[i, :, gi, 0] != 0) & (e >= MIN_EXPONENT) & (e <= MAX_EXPONENT)
                    d = ((term_signs[i, :, gi, 0] * np.exp2(e) - alpha[i, :, gi]) * ok)[:, None] * b
                    if limit is not None:
                        d *= (np.abs(dense[:, cols] + d).max(axis=1) <= limit[:, gi])[:, None]
                    gain = 2 * (d * resid[:, cols]).sum(axis=1) + np.einsum("ng,gh,nh->n", d, hgg, d)
                    take = gain < best_gain - 1e-12 * np.abs(best_gain)
                    best_gain[take], best_step[take] = gain[take], step
                rows = best_step != 0
                if not rows.any():
                    continue
                new_alpha = term_signs[i, rows, gi, 0] * np.exp2(term_exps[i, rows, gi, 0] + best_step[rows])
                d = (new_alpha - alpha[i, rows, gi])[:, None] * b[rows]
                resid[rows] += d @ h[cols]
                dense[rows, cols] += d
                alpha[i, rows, gi] = new_alpha
                term_exps[i, rows, gi, 0] += best_step[rows]
                moved += int(rows.sum())
        if moved == before:
            break
    return moved
