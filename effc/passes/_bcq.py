"""Binary-coding quantization (BCQ) of weight groups: w ~= sum_i alpha_i b_i, b_i in {-1, +1}.

Scales are rounded to (sums of up to ``terms``) signed powers of two, as ShiftAddLLM does, so
that scaling is a shift. A group is fitted by a greedy start and alternating refinement
(least-squares scales -> power-of-two rounding -> nearest codes), keeping each row's best.
Everything here works on many rows at once: ``w`` is [R, m] (R rows, m columns of one group).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from effc.ops.shift_add_matmul import MAX_EXPONENT, MIN_EXPONENT


@cache
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


class Levels:
    """The 2^q levels of rows of scales [R, q], sorted per row, for repeated nearest-code lookups."""

    def __init__(self, alphas: np.ndarray):
        self.combos = sign_combos(alphas.shape[1])
        levels = alphas @ self.combos.T                                      # [R, 2^q]
        self.order = np.argsort(levels, axis=1)
        ranked = np.take_along_axis(levels, self.order, axis=1)
        self.midpoints = ((ranked[:, 1:] + ranked[:, :-1]) * 0.5).T[:, :, None]  # [2^q - 1, R, 1]

    def codes(self, w: np.ndarray) -> np.ndarray:
        """For w [R, m]: codes [R, m, q] whose weighted sum is nearest each w."""
        rank = (w[None] > self.midpoints).sum(axis=0)                          # position among sorted levels
        return self.combos[np.take_along_axis(self.order, rank, axis=1)]


def nearest_codes(w: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """For w [R, m] and scales [R, q]: codes [R, m, q] whose weighted sum is nearest each w."""
    return Levels(alphas).codes(w)


def greedy_scales(w: np.ndarray, q: int) -> np.ndarray:
    """The classic greedy start: b_i = sign(r), alpha_i = mean |r|, r -= alpha_i b_i."""
    residual = w.astype(np.float64).copy()
    alphas = np.empty((w.shape[0], q))
    for i in range(q):
        b = np.where(residual >= 0, 1.0, -1.0)
        alphas[:, i] = np.abs(residual).mean(axis=1)
        residual -= alphas[:, i:i + 1] * b
    return alphas


def least_squares_scales(w: np.ndarray, codes: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per row argmin_alpha sum_j v_j (w_j - (B alpha)_j)^2 with B = codes [R, m, q] and
    weights v [R, m] (1 without); a tiny ridge keeps the q x q normal equations solvable when two
    planes coincide."""
    weighted = codes.transpose(0, 2, 1) if weights is None else codes.transpose(0, 2, 1) * weights[:, None, :]
    gram = weighted @ codes + 1e-9 * np.eye(codes.shape[2])
    return np.linalg.solve(gram, (weighted @ w[:, :, None]))[..., 0]


def best_single_pow2(w: np.ndarray, alphas: np.ndarray, weights: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Round each row's scales [R, q] to single powers of two jointly: of the 2^q floor/ceil
    exponent choices around the least-squares scales, keep the one with least (column-weighted)
    error on w."""
    q = alphas.shape[1]
    mag = np.maximum(np.abs(alphas), 2.0 ** MIN_EXPONENT)
    lo = np.clip(np.floor(np.log2(mag)), MIN_EXPONENT, MAX_EXPONENT - 1).astype(np.int64)
    signs = np.where(alphas < 0, -1.0, 1.0)
    ups = (sign_combos(q) > 0).astype(np.int64)                      # [2^q, q] floor (0) or ceil (1)
    # The levels are symmetric (flip every code), so |w|'s distance to the magnitudes of half of
    # them (first code +1) is w's distance to all of them: half the work.
    half = sign_combos(q)[sign_combos(q)[:, 0] > 0]
    magnitude = np.abs(w)[None]
    best_err, best_e = np.full(w.shape[0], np.inf), lo.copy()
    for up in ups:
        e = lo + up
        levels = np.abs(half @ (signs * np.exp2(e)).T)                    # [2^(q-1), R]
        err = ((magnitude - levels[:, :, None]) ** 2).min(axis=0)         # (leading-axis min: fast)
        err = (err if weights is None else err * weights).sum(axis=1)
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


def fit_group(w: np.ndarray, q: int, terms: int = 1, iters: int = 20,
              weights: np.ndarray | None = None) -> GroupFit:
    """Power-of-two BCQ scales for each row of ``w`` [R, m], by alternating refinement
    (at most ``iters`` rounds; a row stops at its first round without gain). ``weights`` [m] or
    [R, m] (>= 0) weigh each squared error, e.g. by how much its input excites the output."""
    w = w.astype(np.float64)
    rows = w.shape[0]
    if weights is not None:
        weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), w.shape)
        mean = float(weights.mean())
        weights = weights / mean if mean > 0 else None  # all dead: any fit will do
    alphas = greedy_scales(w, q)
    best_err = np.full(rows, np.inf)
    best_s = np.zeros((rows, q, terms))
    best_e = np.zeros((rows, q, terms), dtype=np.int64)
    live = np.arange(rows)  # rows still improving: a row stops at its first round without gain
    for _ in range(iters + 1):
        wl, vl = w[live], None if weights is None else weights[live]
        s, e = best_single_pow2(wl, alphas, vl) if terms == 1 else round_pow2(alphas, terms)
        rounded = pow2_value(s, e)
        codes = nearest_codes(wl, rounded)
        err = (wl - (codes * rounded[:, None, :]).sum(axis=2)) ** 2
        err = (err if vl is None else err * vl).sum(axis=1)
        better = err < best_err[live] * (1 - 1e-9)
        if not better.any():  # converged (typically after 2-3 rounds)
            break
        live, codes = live[better], codes[better]
        best_err[live], best_s[live], best_e[live] = err[better], s[better], e[better]
        alphas = least_squares_scales(w[live], codes, None if weights is None else weights[live])
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
                 bound: np.ndarray | None = None, weighted: bool = False):
        self.q, self.group, self.terms, self.iters, self.weighted = q, group, terms, iters, weighted
        self._costs: np.ndarray | None = None
        self._bound = (None if bound is None else
                       np.abs(bound).reshape(rows, cols // group, group).max(axis=2).T.astype(np.float64))
        self.signs = np.zeros((q, rows, cols))                           # plane codes, +-1
        self.term_signs = np.zeros((q, rows, cols // group, terms))
        self.term_exps = np.zeros((q, rows, cols // group, terms), dtype=np.int64)
        self._alphas = np.zeros((cols // group, rows, q))
        self._levels: tuple[int, Levels] | None = None  # the sorted levels of the group last coded

    def _clip(self, index: int, w: np.ndarray) -> np.ndarray:
        if self._bound is None:
            return w
        limit = self._bound[index].reshape((-1,) + (1,) * (w.ndim - 1))
        return np.clip(w, -limit, limit)

    def weigh(self, costs: np.ndarray) -> None:
        """GPTQ's cost per unit squared error of each input column [cols]; with ``weighted``, each
        group's scales are fitted to the error weighted by it. A group mixes inputs of very
        different strength (post-LN encoders: LayerNorm outlier channels, GELU outputs 1000x the
        median), and the plain fit spends its few levels on weights whose errors barely reach the
        output."""
        if self.weighted:
            self._costs = np.asarray(costs, dtype=np.float64)

    def fit(self, index: int, w: np.ndarray) -> None:
        weights = None if self._costs is None else self._costs[index * self.group:(index + 1) * self.group]
        fit = fit_group(self._clip(index, w), self.q, self.terms, self.iters, weights)
        self.term_signs[:, :, index] = fit.signs.transpose(1, 0, 2)
        self.term_exps[:, :, index] = fit.exps.transpose(1, 0, 2)
        self._alphas[index] = fit.alphas
        self._levels = None

    def column(self, j: int, w: np.ndarray) -> np.ndarray:
        index = j // self.group
        alphas = self._alphas[index]
        if self._levels is None or self._levels[0] != index:
            self._levels = (index, Levels(alphas))
        codes = self._levels[1].codes(self._clip(index, w)[:, None])[:, 0]  # [R, q]
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


def _dense_and_residual(w: np.ndarray, h: np.ndarray, signs: np.ndarray, alpha: np.ndarray):
    """W_hat [N, K] rebuilt from the planes ``signs`` [q, N, K] and group scales ``alpha`` [q, N, G],
    and (W_hat - W) H (half the output error's gradient), which the descents below keep current."""
    q, n, k = signs.shape
    groups = alpha.shape[2]
    dense = (signs.reshape(q, n, groups, k // groups) * alpha[..., None]).sum(axis=0).reshape(n, k)
    return dense, (dense - w) @ h


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
    dense, resid = _dense_and_residual(w, h, signs, alpha)
    moved = 0
    for _ in range(sweeps):
        before = moved
        for gi in range(groups):
            cols = slice(gi * g, (gi + 1) * g)
            hgg = h[cols, cols]
            for i in range(q):
                b = signs[i, :, cols]                                            # [N, g]
                # a scale change delta moves the error by 2 delta (b . resid) + delta^2 (b H b)
                lin, quad = (b * resid[:, cols]).sum(axis=1), ((b @ hgg) * b).sum(axis=1)
                best_gain, best_step = np.zeros(n), np.zeros(n, dtype=np.int64)
                for step in (-1, 1):
                    e = term_exps[i, :, gi, 0] + step
                    ok = (term_signs[i, :, gi, 0] != 0) & (e >= MIN_EXPONENT) & (e <= MAX_EXPONENT)
                    delta = (term_signs[i, :, gi, 0] * np.exp2(e) - alpha[i, :, gi]) * ok
                    if limit is not None:
                        delta *= np.abs(dense[:, cols] + delta[:, None] * b).max(axis=1) <= limit[:, gi]
                    gain = delta * (2 * lin + delta * quad)
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


def refine_codes(w: np.ndarray, h: np.ndarray, signs: np.ndarray, term_signs: np.ndarray, term_exps: np.ndarray,
                 bound: np.ndarray | None = None, block: int = 128) -> float:
    """Coordinate descent on the codes under the exact output error (W_hat - W) H (W_hat - W)^T,
    scales fixed: each column in turn takes, per row, the level nearest to its exact minimiser
    given every other column (clipped to ``bound`` [N, G], the original group magnitude, as
    ``BCQQuantizer`` clips). Every step lowers the error or keeps it. ``signs`` [q, N, K] changes
    in place; returns the relative drop of the error."""
    q, n, k = signs.shape
    groups = term_exps.shape[2]
    g = k // groups
    alpha = pow2_value(term_signs, term_exps)                                     # [q, N, G]
    dense, resid = _dense_and_residual(w, h, signs, alpha)
    before = float((resid * (dense - w)).sum())
    diag = np.maximum(np.diag(h), 1e-300)
    for start in range(0, k, block):
        stop = min(start + block, k)
        delta = np.zeros((n, stop - start))
        for j in range(start, stop):
            gi = j // g
            target = dense[:, j] - resid[:, j] / diag[j]
            if bound is not None:
                target = np.clip(target, -bound[:, gi], bound[:, gi])
            if j % g == 0 or j == start:
                levels = Levels(alpha[:, :, gi].T)
            codes = levels.codes(target[:, None])[:, 0]                           # [N, q]
            d = (codes * alpha[:, :, gi].T).sum(axis=1) - dense[:, j]
            take = d * (2 * resid[:, j] + d * diag[j]) < 0      # the change in this row's error
            if not take.any():
                continue
            d = np.where(take, d, 0.0)
            signs[:, take, j] = codes[take].T
            dense[:, j] += d
            delta[:, j - start] = d
            resid[:, start:stop] += np.outer(d, h[j, start:stop])  # rows of h: symmetric
        resid[:, :start] += delta @ h[start:stop, :start]
        resid[:, stop:] += delta @ h[start:stop, stop:]
    after = float((resid * (dense - w)).sum())
    return (before - after) / max(before, 1e-300)
