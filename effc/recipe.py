"""OUT/recipe.json: everything that decides what `effc compile` wrote, so it can be done again.

Written by `effc compile` beside model.onnx; read by `effc compile --recipe FILE` (flags given on
the command line win) and by `effc tune` (to tune what that compile built). Calibration and
measurement inputs are recorded by source (a path, or zoo:NAME) and by a hash of their arrays,
so a changed file is refused rather than silently giving another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effc.errors import EffcError

NAME = "recipe.json"
VERSION = 1


@dataclass
class Recipe:
    passes: list[str]  # in order, defaults spelled out
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass -> every option's value
    calib: str | None = None  # an absolute .npz path or zoo:NAME
    calib_hash: str | None = None
    opset: int | None = None
    inputs: str | None = None  # the .npz passes were measured on (None: the model's own/seeded inputs)
    inputs_hash: str | None = None
    target: str | None = None
    arch: str | None = None
    records: str = "shipped"  # shipped, none, or an absolute path
    precision: str = "fp32"  # as requested: fp32, bf16 or auto (codegen.json says what auto took)
    model: str | None = None  # what was compiled (informational: --recipe takes MODEL anew)
    budget: str | None = None  # --budget as given ('cosine>=0.99'); lossy passes chose their layers under it
    budget_holdout: float | None = None  # --budget-holdout (None: effc.budget.HOLDOUT_FRACTION)

    def settings(self) -> dict[str, Any]:
        """The compile settings this recipe fixes, by command-line name (for override messages)."""
        return {"passes": self.passes, "calib": self.calib, "opset": self.opset, "inputs": self.inputs,
                "target": self.target, "arch": self.arch, "records": self.records, "budget": self.budget,
                "budget_holdout": self.budget_holdout, "precision": self.precision}


def feeds_hash(feeds: list[dict[str, np.ndarray]] | None) -> str | None:
    """A content hash of a list of input dicts: names, dtypes, shapes and bytes, in order."""
    if not feeds:
        return None
    digest = hashlib.sha256()
    for sample in feeds:
        for name in sorted(sample):
            arr = np.ascontiguousarray(sample[name])
            digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            digest.update(arr.tobytes())
    return "sha256:" + digest.hexdigest()


def source_of(spec: str | None) -> str | None:
    """A data source as recorded: zoo:NAME as is, a path made absolute (found again from any cwd)."""
    if spec is None or spec.startswith("zoo:"):
        return spec
    return str(Path(spec).resolve())


def write(path: Path, recipe: Recipe) -> None:
    from effc.ir import atomic_write_text

    atomic_write_text(path, json.dumps({"effc_recipe": VERSION, **asdict(recipe)}, indent=2) + "\n")


def load(path: str | Path) -> Recipe:
    """The recipe in ``path`` (a recipe.json, or an `effc compile` OUT holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / NAME
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise EffcError(f"{path}: no such recipe (an `effc compile` OUT has one as {NAME})") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise EffcError(f"{path}: not a recipe ({exc})") from None
    if not isinstance(body, dict) or body.get("effc_recipe") != VERSION:
        raise EffcError(f"{path}: not an effc recipe (version {VERSION})")
    body.pop("effc_recipe")
    known = set(Recipe.__dataclass_fields__)
    unknown = sorted(set(body) - known)
    if unknown or not isinstance(body.get("passes"), list) or not isinstance(body.get("options", {}), dict):
        raise EffcError(f"{path}: not an effc recipe (unexpected {', '.join(unknown) or 'passes/options'})")
    return Recipe(**body)


def check_hash(what: str, source: str, feeds, recorded: str | None) -> None:
    """EffcError when data loaded from ``source`` is not what the recipe was made with."""
    if recorded and feeds_hash(feeds) != recorded:
        raise EffcError(f"{what} {source} is not the data the recipe was made with (its hash differs); "
                        f"give the original, or --{what} to use other data on purpose")
