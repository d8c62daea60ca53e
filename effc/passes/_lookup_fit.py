"""Fitting one linear's lookup tables from sampled calibration rows (the lookup pass's numerics).

Encoders: per-chunk k-means (k-means++ start, empty clusters re-seeded on the worst-fitted rows)
for ``pq``; per-dimension thresholds as the sign-bucket centres for ``hash`` (1-bit Lloyd-Max by
default: each dim's split that minimises its two halves' squared error, which follows a skewed
input such as a GELU output where the median does not; or the median). The starting tables are
each code's representative point times the weight's chunk (centroid . W_c^T; for a hash bucket,
the mean of its rows, or its sign corner when no row fell in it). They are then refitted jointly
by ridge least squares against the dense layer's outputs on the same rows, pulled towards the
starting tables (a code seen on few rows keeps close to its representative's product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from effc.ops import lookup_linear as op

EXACT_SOLVE_MAX = 2048  # C*k up to this: solve the normal equations; above: block Gauss-Seidel sweeps
SWEEPS = 12


@dataclass
class Fitted:
    """A layer's LookupLinear constants and what they cost on the fitting rows."""

    encoder_const: np.ndarray  # float32 [C, k, v] (pq) or [C, v] (hash)
    tables: np.ndarray         # int8 or float32 [C, k, N]
    table_scale: np.ndarray    # float32 [C]
    bias: np.ndarray           # float32 [N]
    rel_error: float           # ||y' - y|| / ||y|| on the fitting rows (y: the dense layer's outputs)
    cosine: float

    @property
    def table_bytes(self) -> int:
        return op.table_bytes(self.encoder_const, self.tables, self.table_scale)


def kmeans(chunks: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Centroids float32 [C, k, v] of rows [R, C, v], each chunk clustered on its own (vectorised over C)."""
    rows, count, v = chunks.shape
    data = chunks.astype(np.float64)
    centroids = np.empty((count, k, v))
    every = np.arange(count)
    centroids[:, 0] = data[rng.integers(0, rows, count), every]
    nearest = ((data - centroids[None, :, 0]) ** 2).sum(-1)  # [R, C]
    for j in range(1, k):  # k-means++: the next centre drawn with probability ~ squared distance
        cumulative = np.cumsum(nearest, axis=0)
        pick = rng.random(count) * cumulative[-1]
        index = np.minimum((cumulative < pick[None]).sum(axis=0), rows - 1)
        centroids[:, j] = data[index, every]
        nearest = np.minimum(nearest, ((data - centroids[None, :, j]) ** 2).sum(-1))
    for _ in range(iters):
        distance = _distances(data, centroids)
        assign = distance.argmin(-1)  # [R, C]
        flat = (assign + every[None] * k).ravel()
        counts = np.bincount(flat, minlength=count * k).reshape(count, k)
        sums = np.stack([np.bincount(flat, weights=data[..., d].ravel(), minlength=count * k) for d in range(v)], -1)
        updated = sums.reshape(count, k, v) / np.maximum(counts, 1)[..., None]
        moved = np.where(counts[..., None] > 0, updated, centroids)
        _reseed_empty(data, moved, counts, np.take_along_axis(distance, assign[..., None], -1)[..., 0])
        if np.allclose(moved, centroids, rtol=0, atol=1e-7):
            centroids = moved
            break
        centroids = moved
    return centroids.astype(np.float32)


def _distances(data: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared distances [R, C, k] of rows [R, C, v] to centroids [C, k, v]."""
    cross = np.matmul(data.transpose(1, 0, 2), centroids.transpose(0, 2, 1)).transpose(1, 0, 2)
    return (data ** 2).sum(-1)[..., None] - 2 * cross + (centroids ** 2).sum(-1)[None]


def _reseed_empty(data: np.ndarray, centroids: np.ndarray, counts: np.ndarray, error: np.ndarray) -> None:
    """An empty cluster takes the row its chunk fits worst (a different row for each empty one)."""
    for c, j in zip(*np.nonzero(counts == 0)):
        worst = int(np.argmax(error[:, c]))
        centroids[c, j] = data[worst, c]
        error[worst, c] = -1.0


CENTRES = ("lloyd", "median")


def hash_centres(chunks: np.ndarray, method: str = "lloyd") -> np.ndarray:
    """Per-dimension thresholds [C, v] of rows [R, C, v]. ``median``: each sign bit splits the rows
    in half. ``lloyd``: the optimal 1-bit scalar quantizer of each dim (1-D 2-means, solved exactly
    by scanning the sorted values): the split minimising the squared distance of the rows to their
    side's mean, the threshold halfway between the two means (Lloyd-Max's condition)."""
    rows, count, v = chunks.shape
    if method == "median" or rows < 2:
        return np.median(chunks, axis=0).astype(np.float32)
    ordered = np.sort(chunks.reshape(rows, count * v).astype(np.float64), axis=0)
    below = np.arange(1, rows, dtype=np.float64)[:, None]  # rows left of each split
    left = np.cumsum(ordered, axis=0)[:-1]
    right = ordered.sum(axis=0)[None] - left
    # the squared error of a split is sum x^2 - (left^2 / n_l + right^2 / n_r): maximise the latter
    split = np.argmax(left ** 2 / below + right ** 2 / (rows - below), axis=0)
    columns = np.arange(count * v)
    low = left[split, columns] / (split + 1)
    high = right[split, columns] / (rows - split - 1)
    return ((low + high) / 2).reshape(count, v).astype(np.float32)


def representatives(chunks: np.ndarray, encoder: str, encoder_const: np.ndarray, codes: np.ndarray,
                    k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """A point per code [C, k, v] whose product with W_c starts its table row: the centroid (pq),
    or the rows in the bucket fitted alone (their mean; with soft row weights w, sum w x / sum w^2,
    so that w times the row matches them), its sign corner (centre +- each dim's mean |deviation|)
    when no row fell in it (hash)."""
    if encoder == "pq":
        return encoder_const.astype(np.float64)
    rows, count, v = chunks.shape
    flat = (codes + np.arange(count)[None] * k).ravel()
    w = np.ones(codes.shape) if weights is None else weights.astype(np.float64)
    mass = np.bincount(flat, weights=(w * w).ravel(), minlength=count * k).reshape(count, k)
    sums = np.stack([np.bincount(flat, weights=(w * chunks[..., d]).ravel().astype(np.float64), minlength=count * k)
                     for d in range(v)], -1).reshape(count, k, v)
    spread = np.abs(chunks - encoder_const[None]).mean(axis=0)  # [C, v]
    signs = ((np.arange(k)[:, None] >> np.arange(v)[None]) & 1) * 2.0 - 1.0  # [k, v]
    corners = encoder_const[:, None, :] + signs[None] * spread[:, None, :]
    return np.where(mass[..., None] > 0, sums / np.maximum(mass, 1e-30)[..., None], corners)


def design(codes: np.ndarray, weights: np.ndarray, k: int) -> scipy.sparse.csr_matrix:
    """The rows' one-hot design matrix [R, C*k], sparse (each row's weight at its code in each chunk)."""
    rows, count = codes.shape
    columns = (codes + np.arange(count)[None] * k).ravel()
    starts = np.arange(0, rows * count + 1, count)
    return scipy.sparse.csr_matrix((weights.ravel().astype(np.float64), columns, starts), shape=(rows, count * k))


class Refit:
    """Tables [C, k, N] minimising ||sum_c w_c T[c, code_c] - y||^2 + lam ||T - start||^2 over the
    rows, lam = ridge * (rows per code on average). Solved exactly when C*k is small (the normal
    equations factored once, for every linear that reads the same rows), else by block
    Gauss-Seidel sweeps (one chunk's tables at a time, each an exact per-code solve)."""

    def __init__(self, codes: np.ndarray, weights: np.ndarray, k: int, ridge: float):
        self.codes, self.weights, self.k = codes, weights, k
        count = codes.shape[1]
        self.lam = max(ridge * len(codes) / k, 1e-9)
        self.design = design(codes, weights, k) if count * k <= EXACT_SOLVE_MAX else None
        if self.design is not None:
            gram = (self.design.T @ self.design).toarray() + self.lam * np.eye(count * k)
            self.factor = scipy.linalg.cho_factor(gram)

    def __call__(self, target: np.ndarray, start: np.ndarray) -> np.ndarray:
        count, k, n = start.shape
        if self.design is None:
            return _gauss_seidel(self.codes, self.weights, target, start, self.lam)
        rhs = self.design.T @ target + self.lam * start.reshape(count * k, n)
        return scipy.linalg.cho_solve(self.factor, rhs).reshape(count, k, n)


def refit(codes: np.ndarray, weights: np.ndarray, target: np.ndarray, start: np.ndarray, ridge: float) -> np.ndarray:
    """One solve of :class:`Refit`."""
    return Refit(codes, weights, start.shape[1], ridge)(target, start)


def _gauss_seidel(codes: np.ndarray, weights: np.ndarray, target: np.ndarray, start: np.ndarray,
                  lam: float, sweeps: int = SWEEPS) -> np.ndarray:
    count, k, n = start.shape
    rows = np.arange(len(codes))
    tables = start.copy()
    residual = target.copy()
    for c in range(count):
        residual -= weights[:, c, None] * tables[c, codes[:, c]]
    # each chunk's rows summed per code as a sparse [k, R] product (np.add.at is ~50x slower)
    pick = [scipy.sparse.csr_matrix((weights[:, c].astype(np.float64), (codes[:, c], rows)), shape=(k, len(codes)))
            for c in range(count)]
    masses = [np.bincount(codes[:, c], weights=weights[:, c] ** 2, minlength=k) for c in range(count)]
    for _ in range(sweeps):
        for c in range(count):
            w, code = weights[:, c, None], codes[:, c]
            # the residual without chunk c, summed per code: pick (residual + w T_c[code]) = pick residual + mass T_c
            pulled = pick[c] @ residual + masses[c][:, None] * tables[c]
            updated = (pulled + lam * start[c]) / (masses[c] + lam)[:, None]
            residual -= w * (updated - tables[c])[code]
            tables[c] = updated
    return tables


def to_int8(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 tables with one scale per chunk's table: (int8 [C, k, N], float32 [C])."""
    peak = np.abs(tables).reshape(len(tables), -1).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    quantized = np.clip(np.rint(tables / scale[:, None, None]), -127, 127).astype(np.int8)
    return quantized, scale.astype(np.float32)


@dataclass
class Encoding:
    """How the rows of one layer input are encoded, shared by every linear that reads it."""

    encoder: str
    encoder_const: np.ndarray  # centroids [C, k, v] or centres [C, v]
    codes: np.ndarray          # [R, C] of the sampled rows, by the op's own encode
    weights: np.ndarray        # [R, C]: 1, or the soft weights
    points: np.ndarray         # [C, k, v]: each code's representative (see ``representatives``)
    refit: Refit | None


def encode_rows(rows: np.ndarray, encoder: str, v: int, k: int, soft: bool, iters: int, ridge: float,
                refit_tables: bool, seed: int = 0, centres: str = "lloyd") -> Encoding:
    """The encoder learnt on calibration ``rows`` [R, K] (K = C * v), the rows' codes, and the
    factored refit problem they pose."""
    chunks = rows.reshape(len(rows), rows.shape[1] // v, v)
    if encoder == "pq":
        encoder_const = kmeans(chunks, k, iters, np.random.default_rng(seed))
    else:
        encoder_const, k = hash_centres(chunks, centres), 2 ** v
    codes = op.encode(rows, encoder, encoder_const)
    weights = (op.soft_weights(rows, encoder_const) if encoder == "hash" and soft else np.ones(codes.shape))
    points = representatives(chunks, encoder, encoder_const, codes, k, weights)
    return Encoding(encoder, encoder_const, codes, weights, points,
                    Refit(codes, weights, k, ridge) if refit_tables else None)


def fit_linear(weight: np.ndarray, bias: np.ndarray | None, rows: np.ndarray, encoding: Encoding,
               table_dtype: str) -> Fitted:
    """The lookup constants of y = x W^T + b (W [N, K]) for calibration ``rows`` [R, K] encoded by ``encoding``."""
    n, width = weight.shape
    count, k, v = encoding.points.shape
    w64 = weight.astype(np.float64)
    b = np.zeros(n, np.float32) if bias is None else bias.astype(np.float32)
    start = np.einsum("ckv,ncv->ckn", encoding.points, w64.reshape(n, count, v))
    target = rows.astype(np.float64) @ w64.T
    tables = encoding.refit(target, start) if encoding.refit is not None else start
    if table_dtype == "int8":
        stored, scale = to_int8(tables)
    else:
        stored, scale = tables.astype(np.float32), np.ones(count, np.float32)
    dense = target + b
    weights = None if np.all(encoding.weights == 1) else encoding.weights
    got = op.lookup_sum(encoding.codes, weights, stored, scale, b)
    norm = float(np.linalg.norm(dense))
    rel = float(np.linalg.norm(got - dense) / norm) if norm > 0 else 0.0
    cosine = float(np.sum(got * dense) / max(norm * float(np.linalg.norm(got)), 1e-30))
    return Fitted(encoding.encoder_const, stored, scale, b, rel, cosine)
