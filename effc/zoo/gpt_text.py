"""gpt-text: a small pre-LN byte-level GPT trained on the Python standard library's source.

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``
excluded), in sorted relative-path order, as raw bytes (vocab 256). Split by file: a file is
held out when the first 8 bytes of the SHA-256 of its relative POSIX path, read as a big-endian
integer, are 0 mod 20 (92 of 1790 files on CPython 3.11.7).
The stdlib differs between Python versions, so the held-out evaluation windows are frozen in
``effc/zoo/data/gpt_text_heldout.npz`` (written by ``tools/train_gpt_text.py``); the metric
never reads the interpreter's files. Training and calibration windows do come from the
running interpreter's stdlib. Weights come from ``tools/train_gpt_text.py``.
"""

from __future__ import annotations

import hashlib
import os
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


def extract_held_out_windows(count: int = HELD_OUT_WINDOWS) -> np.ndarray:
    """[count, CONTEXT] uint8 windows spread evenly over the held-out files, each inside one file.

    Evenly spaced positions over the concatenated held-out bytes pick the file; the window is
    moved back so that it ends inside that file. Files shorter than a window are skipped.
    """
    files = [f for f in read_corpus(held_out=True) if len(f) >= CONTEXT]
    ends = np.cumsum([len(f) for f in files])
    windows = np.empty((count, CONTEXT), dtype=np.uint8)
    for i, pos in enumerate(np.linspace(0, ends[-1] - 1, count).astype(np.int64)):
        k = int(np.searchsorted(ends, pos, side="right"))
        start = min(int(pos - (ends[k] - len(files[k]))), len(files[k]) - CONTEXT)
        windows[i] = np.frombuffer(files[k][start : start + CONTEXT], dtype=np.uint8)
    return windows


@lru_cache(maxsize=1)
def held_out_windows() -> np.ndarray:
    """The frozen [128, 128] held-out windows as int64 token ids."""
    if not HELD_OUT.exists():
        raise EffcError(f"gpt-text held-out data missing at {HELD_OUT} (run tools/train_gpt_text.py)")
    with np.load(HELD_OUT) as data:
        return data["windows"].astype(np.int64)


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
    """Random windows [1, 128] int64 of the training files of this interpreter's stdlib."""
    stream = training_stream()
    starts = np.random.default_rng(seed).integers(0, len(stream) - CONTEXT, size=count)
    return [{"input_ids": stream[s : s + CONTEXT].astype(np.int64)[None]} for s in starts]


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
    (their own next bytes are the targets, so no labels are needed)."""
    def perplexity(runs: list[dict]) -> float:
        total, count = 0.0, 0
        for feed, run in zip(feeds, runs):
            nll, n = next_byte_nll(run["logits"], feed["input_ids"])
            total, count = total + nll, count + n
        return float(np.exp(total / max(count, 1)))

    return perplexity(outputs) / perplexity(reference) - 1.0
