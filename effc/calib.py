"""Calibration sets and activation statistics.

A calibration set is a list of feed dicts (one sample each). It comes from an .npz (one array
per model input, first axis = samples) or from a zoo model's training or validation split, never
from the data its metric uses. Statistics are gathered by running ONNX Runtime on a copy of the
model whose interesting values are extra graph outputs, accumulating the Gram matrix X^T X of
each value in float64 a chunk of samples at a time, so memory stays at one K x K matrix per
value (and a chunk of buffered rows).
Rows at padded positions (an ``attention_mask`` input that is 0 there) are left out: the
model's output never reads them, and in short padded sentences they would outnumber the
real tokens and steer error compensation towards activations that do not matter.
"""

from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError

Feeds = list[dict[str, np.ndarray]]
DEFAULT_COUNT = 64
ENCODER_COUNT = 512  # a sentence encoder's default: every calibration sentence, up to this many
MASK_INPUTS = ("attention_mask",)
PACK_WORDS = 48  # ~60 word-piece tokens: a 64-token encoder input nearly full of real tokens


# --- calibration sets --------------------------------------------------------------------

def load_npz(path: str | Path) -> Feeds:
    """One feed per sample of an .npz whose arrays share their first (sample) axis."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:  # noqa: BLE001 (numpy raises assorted types on a bad file)
        raise EffcError(f"{path}: not an .npz of inputs ({exc})") from None
    if not arrays:
        raise EffcError(f"{path}: holds no arrays")
    counts = {name: len(a) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise EffcError(f"{path}: arrays disagree on the sample count {counts}")
    return [{name: a[i:i + 1] for name, a in arrays.items()} for i in range(next(iter(counts.values())))]


def save_npz(feeds: Feeds, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    return path


def zoo_calibration(name: str, count: int | None = None, seed: int = 0) -> Feeds:
    """A zoo model's calibration set of ``count`` samples: its ``calibration_inputs`` (a training
    or validation split) when it has one; for sentence encoders, one calibration sentence per sample
    (``calibration_texts``); else seeded sample inputs (only the random-weight models lack a
    training split). ``count=None``: DEFAULT_COUNT samples, or for a sentence encoder every
    calibration sentence (at most ENCODER_COUNT)."""
    from effc import zoo

    module = zoo.get(name)
    if hasattr(module, "encode") and hasattr(module, "sentences") and not hasattr(module, "calibration_inputs"):
        return module.encode(calibration_texts(module, count, seed))
    count = DEFAULT_COUNT if count is None else count
    if hasattr(module, "calibration_inputs"):
        return module.calibration_inputs(count, seed)
    return module.sample_inputs(count, seed + 7919)


def calibration_sentences(module) -> list[str]:
    """A sentence encoder's calibration pool: the module's shipped ``data/<module>_calibration.txt``
    (everyday English like its evaluation set, checked disjoint from it), else the Python help
    topics; never a sentence of the evaluation set."""
    held_out = set(module.sentences())
    path = Path(module.__file__).parent / "data" / f"{module.__name__.rsplit('.', 1)[-1]}_calibration.txt"
    pool = ([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if path.exists() else documentation_sentences())
    return [s for s in pool if s not in held_out]


def calibration_texts(module, count: int | None = None, seed: int = 0, words: int = 0) -> list[str]:
    """``count`` texts for a sentence encoder (None: every pool sentence, at most ENCODER_COUNT),
    in a seeded shuffled order. With ``words=0`` each text is one sentence, the unit a sentence
    embedder is run on; ``words > 0`` packs several sentences into each, up to about that many
    words (PACK_WORDS fills a 64-token input).

    Single sentences calibrate better although they carry fewer tokens per sample: the special
    tokens and attention patterns of a short input are what the model sees at inference, and
    GPTQ fitted to long packed contexts overfits them (all-MiniLM-L6-v2 at 3 bits, held-out
    sentence cosine: 0.943 with 64 packed texts, 0.961 with the 238 pool sentences, before
    the weighted fit and refinement; attention-output layers showed the gap most)."""
    pool = calibration_sentences(module)
    count = min(len(pool), ENCODER_COUNT) if count is None else count
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    texts, cursor = [], 0
    for _ in range(count):
        picked: list[str] = []
        while not picked or sum(len(s.split()) for s in picked) + len(pool[order[cursor % len(pool)]].split()) <= words:
            picked.append(pool[order[cursor % len(pool)]])
            cursor += 1
            if cursor % len(pool) == 0:  # a pass over the pool is done: reshuffle for the next
                order = rng.permutation(len(pool))
        texts.append(" ".join(picked))
    return texts


def documentation_sentences(min_len: int = 40, max_len: int = 200) -> list[str]:
    """English sentences of the interpreter's help topics (pydoc_data), in a fixed order."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    sentences = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return [s for s in sentences if min_len <= len(s) <= max_len and s[0].isupper() and ">>>" not in s]


# --- activation statistics ----------------------------------------------------------------

@dataclass
class Gram:
    """Sum of x x^T and of x over every row x (last axis = features) seen for one value, and the row count."""

    xtx: np.ndarray
    rows: int
    xsum: np.ndarray | None = None

    def hessian(self) -> np.ndarray:
        """GPTQ's H = 2 X^T X / n."""
        return 2.0 * self.xtx / max(self.rows, 1)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows' second moment X^T X / n and mean: enough for any linear map's output error."""
        n = max(self.rows, 1)
        xsum = self.xsum if self.xsum is not None else np.zeros(self.xtx.shape[0])
        return self.xtx / n, xsum / n


def gram_matrices(model: ir.Model, feeds: Feeds, names: list[str], progress: bool = True) -> dict[str, Gram]:
    """X^T X of each named value over all ``feeds`` (values read by several nodes are captured once)."""
    names = list(dict.fromkeys(names))
    grams: dict[str, Gram] = {}
    with single_threaded_blas():
        _accumulate(stream_values(model, feeds, names, progress), names, grams)
    return grams


def stream_values(model: ir.Model, feeds: Feeds, names: list[str], progress: bool = True,
                  label: str = "calibrating"):
    """Yield (feed, {name: array}) per feed: the named values of ``model`` run on it."""
    from effc.verify import OrtRunner

    names = list(dict.fromkeys(names))
    values = {v.name: v for v in _all_values(model.graph)}
    missing = [n for n in names if n not in values]
    if missing:
        raise EffcError(f"cannot capture {missing[:3]}: no such values")
    from_inputs = {n for n in names if values[n].is_graph_input()}
    present = {v.name for v in model.graph.outputs}
    # The values become extra outputs of the model itself only while the session is made (it keeps
    # its own serialized copy): no second copy of a large model's weights in memory.
    added = [values[n] for n in names if n not in from_inputs and n not in present]
    model.graph.outputs.extend(added)
    try:
        runner = OrtRunner(model)
    finally:
        del model.graph.outputs[len(model.graph.outputs) - len(added):]
    for feed in _progress(feeds, label, progress):
        outputs = runner(feed)
        yield feed, {n: np.asarray(feed[n] if n in from_inputs else outputs[n]) for n in names}


def _accumulate(captured, names: list[str], grams: dict[str, Gram], chunk: int = 1 << 19) -> None:
    # Rows are buffered (as produced) and multiplied a chunk of about ``chunk`` numbers at a time:
    # one x^T x per sample pays a full K x K update for a dozen real tokens of a short sentence,
    # which dominated calibration.
    pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
    sizes = dict.fromkeys(names, 0)

    def flush(n: str) -> None:
        x = np.concatenate(pending[n]).astype(np.float64)
        grams[n].xtx += x.T @ x
        grams[n].xsum += x.sum(axis=0)
        grams[n].rows += x.shape[0]
        pending[n], sizes[n] = [], 0

    for feed, values in captured:
        mask = row_mask(feed)
        for n in names:
            x = token_rows(values[n], mask)
            if n not in grams:
                grams[n] = Gram(np.zeros((x.shape[1], x.shape[1])), 0, np.zeros(x.shape[1]))
            pending[n].append(x)
            sizes[n] += x.size
            if sizes[n] >= chunk:
                flush(n)
    for n in names:
        if pending[n]:
            flush(n)


def token_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``x`` as rows of its last axis, without the padded positions where ``mask`` (row_mask) has one
    entry per row (token rows, not e.g. per-sample rows)."""
    x = x.reshape(-1, x.shape[-1])
    return x[mask] if mask is not None and mask.size == x.shape[0] else x


def row_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """Boolean per token row (flattened batch x sequence) from the feed's attention mask, if any."""
    for name in MASK_INPUTS:
        if name in feed:
            return np.asarray(feed[name]).reshape(-1) != 0
    return None


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _progress(items, label: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    # tqdm, not rich: the CLI already shows a rich status line, and rich allows one live display.
    return tqdm(items, desc=label, unit="sample", leave=False, file=sys.stderr, disable=None)


@contextlib.contextmanager
def single_threaded_blas():
    """Many small products and factorisations: threaded BLAS only oversubscribes the cores
    (a 384 x 384 Cholesky measured 150x slower with OpenBLAS's threads on 2 shared cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not installed: run as is
        yield
        return
    with threadpool_limits(1):
        yield


# --- bounded row samples --------------------------------------------------------------------

class Reservoir:
    """A uniform sample of at most ``size`` rows of a stream of row blocks (Vitter's algorithm R):
    memory stays at ``size`` rows however much calibration data flows past."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seen = 0
        self.rows: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32)
        if self.rows is None:
            self.rows = np.empty((0, block.shape[1]), np.float32)
        room = self.size - len(self.rows)
        if room > 0:
            self.rows = np.concatenate([self.rows, block[:room]])
            self.seen += min(room, len(block))
            block = block[room:]
        if not len(block):
            return
        # row t of the stream (0-based) replaces a uniformly chosen slot with probability size / (t + 1)
        slots = np.floor(self._rng.random(len(block)) * (self.seen + 1 + np.arange(len(block)))).astype(np.int64)
        self.seen += len(block)
        kept = np.nonzero(slots < self.size)[0]
        # a later row that lands on the same slot wins, as in the sequential algorithm
        _, last = np.unique(slots[kept][::-1], return_index=True)
        chosen = kept[::-1][last]
        self.rows[slots[chosen]] = block[chosen]


def sample_rows(model: ir.Model, feeds: Feeds, names: list[str], size: int, seed: int = 0,
                progress: bool = True) -> dict[str, Reservoir]:
    """A bounded uniform sample of the rows (last axis = features) of each named value over all
    ``feeds``, padded positions left out as for :func:`gram_matrices`."""
    names = list(dict.fromkeys(names))
    samples = {n: Reservoir(size, seed + i) for i, n in enumerate(names)}
    for feed, values in stream_values(model, feeds, names, progress, "sampling activations"):
        mask = row_mask(feed)
        for n in names:
            samples[n].add(token_rows(values[n], mask))
    return samples
