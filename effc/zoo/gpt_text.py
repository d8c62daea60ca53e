"""gpt-text: a small pre-LN byte-level GPT trained on the Python standard library's source.

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``
excluded), in sorted relative-path order, as raw bytes (vocab 256). Split by file: a file is
held out when the first 8 bytes of the SHA-256 of its relative POSIX path, read as a big-endian
integer, are 0 mod 20 (92 of 1790 files on CPython 3.11.7).
The stdlib differs between Python versions, so the held-out evaluation windows are frozen in
``effc/zoo/data/gpt_text_heldout.npz`` (written by ``tools/train_gpt_text.py``); the metric
never reads the interpreter's files. Training windows do come from the running interpreter's
stdlib. Weights come from ``tools/train_gpt_text.py``.

Calibration draws from validation windows: 128-byte windows of the held-out files that share
no byte with the evaluation windows, frozen in ``effc/zoo/data/gpt_text_validation.npz`` (with
the file and offset of every window, evaluation windows included; written by
``tools/freeze_gpt_text_validation.py``). They must be unseen by training: the budget
(``--budget 'metric<=X%'``) measures the perplexity change on the held-out part of the
calibration set, and on training text the model is more robust than on unseen text (lookup
linears: +0.90% measured on training windows, +1.02% on the held-out text). They must also be
disjoint from the evaluation windows, so the metric stays held out.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from effc.errors import EffcError
from effc.zoo._trained import trained_module

DESCRIPTION = "pre-LN byte GPT (d 128, 4 layers, ctx 128) trained on the Python stdlib; metric perplexity/byte"
VERSION = 1
CONFIG = dict(vocab=256, context=128, dim=128, depth=4, heads=4, mlp_hidden=512)
CONTEXT = CONFIG["context"]
WEIGHTS = Path(__file__).parent / "weights" / "gpt_text.safetensors"
HELD_OUT = Path(__file__).parent / "data" / "gpt_text_heldout.npz"
HELD_OUT_MODULUS = 20
HELD_OUT_WINDOWS = 128
VALIDATION = Path(__file__).parent / "data" / "gpt_text_validation.npz"
VALIDATION_WINDOWS = 2048  # of the ~15,000 whole windows the held-out files hold besides the evaluation ones


# ---- corpus ----------------------------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Relative POSIX paths of the stdlib's .py files, sorted (third-party packages excluded)."""
    root = stdlib_root()
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruned in place so the walk never descends into installed third-party packages.
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel = Path(folder).relative_to(root)
        files += [(rel / name).as_posix() for name in names if name.endswith(".py")]
    files.sort()
    if not files:
        raise EffcError(f"no .py files under the stdlib at {root}; gpt-text needs the stdlib sources")
    return tuple(files)


def is_held_out(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_MODULUS == 0


def read_corpus(held_out: bool) -> list[bytes]:
    """The byte contents of the training (or held-out) files, in sorted path order."""
    root = stdlib_root()
    return [(root / rel).read_bytes() for rel in stdlib_files() if is_held_out(rel) == held_out]


@lru_cache(maxsize=1)
def training_stream() -> np.ndarray:
    """All training files concatenated into one uint8 array (~30 MB on CPython 3.11)."""
    return np.frombuffer(b"".join(read_corpus(held_out=False)), dtype=np.uint8)


def held_out_files() -> list[tuple[str, bytes]]:
    """(relative path, bytes) of the held-out files at least one window long, in sorted path order."""
    root = stdlib_root()
    files = [(rel, (root / rel).read_bytes()) for rel in stdlib_files() if is_held_out(rel)]
    return [(rel, data) for rel, data in files if len(data) >= CONTEXT]


def _evaluation_positions(lengths: list[int], count: int) -> list[tuple[int, int]]:
    """(file index, start) of ``count`` windows spread evenly over files of these lengths: evenly
    spaced positions over the concatenated bytes pick the file; the window is moved back so that
    it ends inside that file."""
    ends = np.cumsum(lengths)
    positions = []
    for pos in np.linspace(0, ends[-1] - 1, count).astype(np.int64):
        k = int(np.searchsorted(ends, pos, side="right"))
        positions.append((k, min(int(pos - (ends[k] - lengths[k])), lengths[k] - CONTEXT)))
    return positions


def _windows(files: list[tuple[str, bytes]], positions: list[tuple[int, int]]) -> np.ndarray:
    return np.stack([np.frombuffer(files[k][1][s : s + CONTEXT], dtype=np.uint8) for k, s in positions])


def extract_held_out_windows(count: int = HELD_OUT_WINDOWS) -> np.ndarray:
    """[count, CONTEXT] uint8 evaluation windows spread evenly over the held-out files, each inside one file."""
    files = held_out_files()
    return _windows(files, _evaluation_positions([len(d) for _, d in files], count))


def extract_validation_windows(count: int = VALIDATION_WINDOWS) -> dict[str, np.ndarray]:
    """``count`` windows of the held-out files sharing no byte with the evaluation windows, and where
    every window (validation and evaluation) lies: each file is cut into consecutive windows from its
    start, those overlapping an evaluation window are dropped, and ``count`` are taken evenly spread
    over the rest (in file order)."""
    files = held_out_files()
    evaluation = _evaluation_positions([len(d) for _, d in files], HELD_OUT_WINDOWS)
    taken: dict[int, list[int]] = {}
    for k, start in evaluation:
        taken.setdefault(k, []).append(start)
    free = [(k, s) for k, (_, data) in enumerate(files) for s in range(0, len(data) - CONTEXT + 1, CONTEXT)
            if all(abs(s - e) >= CONTEXT for e in taken.get(k, []))]
    if count > len(free):
        raise EffcError(f"the held-out files hold {len(free)} validation windows; asked for {count}")
    chosen = [free[i] for i in np.linspace(0, len(free) - 1, count).astype(np.int64)]  # steps >= 1: distinct
    return {"windows": _windows(files, chosen),
            "files": np.array([files[k][0] for k, _ in chosen]), "starts": np.array([s for _, s in chosen]),
            "evaluation_files": np.array([files[k][0] for k, _ in evaluation]),
            "evaluation_starts": np.array([s for _, s in evaluation])}


def write_validation_windows(path: Path = VALIDATION, count: int = VALIDATION_WINDOWS) -> int:
    """Freeze the validation windows of this interpreter's stdlib into ``path``; refused (EffcError)
    where its held-out files do not give the frozen evaluation windows (another Python version):
    disjointness from them could not be shown. The number of windows written."""
    if not np.array_equal(extract_held_out_windows(), held_out_windows().astype(np.uint8)):
        raise EffcError("this interpreter's stdlib does not reproduce the frozen evaluation windows "
                        f"({HELD_OUT.name}); freeze validation windows with the Python that made them")
    data = extract_validation_windows(count)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **data, python=np.array(sys.version.split()[0]))
    return len(data["windows"])


def _frozen_windows(path: Path, what: str, tool: str) -> np.ndarray:
    if not path.exists():
        raise EffcError(f"gpt-text {what} data missing at {path} (run tools/{tool})")
    with np.load(path) as data:
        return data["windows"].astype(np.int64)


@lru_cache(maxsize=1)
def held_out_windows() -> np.ndarray:
    """The frozen [128, 128] held-out windows as int64 token ids."""
    return _frozen_windows(HELD_OUT, "held-out", "train_gpt_text.py")


@lru_cache(maxsize=1)
def validation_windows() -> np.ndarray:
    """The frozen [2048, 128] validation windows as int64 token ids."""
    return _frozen_windows(VALIDATION, "validation", "freeze_gpt_text_validation.py")


# ---- model -----------------------------------------------------------------------------------

def new_module():
    """The untrained network (the training script starts from this)."""
    from effc.zoo.nets import GPT

    return GPT(**CONFIG)


def torch_model():
    import torch

    module = trained_module(new_module, WEIGHTS, "tools/train_gpt_text.py")
    return module, (torch.from_numpy(held_out_windows()[:1]),)


def build():
    from effc.frontend.torch import from_torch

    module, example = torch_model()
    return from_torch(module, example, input_names=["input_ids"], output_names=["logits"])


def sample_inputs(count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Held-out windows [1, 128] int64, one per feed."""
    windows = held_out_windows()
    rows = np.random.default_rng(seed).choice(len(windows), size=count, replace=count > len(windows))
    # Copies, so a caller that writes into a feed cannot corrupt the cached windows.
    return [{"input_ids": windows[r : r + 1].copy()} for r in rows]


def calibration_inputs(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Distinct validation windows [1, 128] int64, one per feed: held-out text unseen by training and
    disjoint from the evaluation windows (see the module docstring). No repeats: a repeated window
    could land both in the part a pass fits on and in the budget's held-out part, so ``count`` above
    the pool is refused."""
    pool = validation_windows()
    if count > len(pool):
        raise EffcError(f"gpt-text has {len(pool)} validation windows to calibrate on; asked for {count}")
    rows = np.random.default_rng(seed).choice(len(pool), size=count, replace=False)
    return [{"input_ids": pool[r : r + 1].copy()} for r in rows]


def next_byte_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-byte NLL (nats) of ``ids`` [1, T] under ``logits`` [1, T, V], and its count."""
    z = logits.reshape(-1, logits.shape[-1])[:-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    targets = ids.reshape(-1)[1:]
    return float(-log_probs[np.arange(len(targets)), targets].sum()), len(targets)


def evaluate(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> tuple[str, float]:
    """exp(mean NLL per byte) over the 128 frozen held-out windows, all 127 predictions each."""
    total, count = 0.0, 0
    for window in held_out_windows():
        ids = window[None].copy()
        nll, n = next_byte_nll(run({"input_ids": ids})["logits"], ids)
        total, count = total + nll, count + n
    return "perplexity", float(np.exp(total / count))


def budget_metric(feeds: list[dict[str, np.ndarray]], outputs: list[dict], reference: list[dict]) -> float:
    """`--budget 'metric<=X%'`: the relative perplexity increase on the held-out calibration windows
    (their own next bytes are the targets, so no labels are needed). A mean over 127 predictions a
    window, compared as measured (see effc.budget on measurement noise)."""
    def perplexity(runs: list[dict]) -> float:
        total, count = 0.0, 0
        for feed, run in zip(feeds, runs):
            nll, n = next_byte_nll(run["logits"], feed["input_ids"])
            total, count = total + nll, count + n
        return float(np.exp(total / max(count, 1)))

    return perplexity(outputs) / perplexity(reference) - 1.0
