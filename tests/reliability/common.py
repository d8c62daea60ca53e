"""Helpers for the reliability tests: run effc as a user does, check one-line refusals and OUT integrity."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from effc.verify import OrtRunner, deviation

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def effc_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "effc.cli", *map(str, args)]


def effc(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(effc_cmd(*args), capture_output=True, text=True, timeout=timeout, env=ENV)


def one_line_refusal(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def check_out_consistent(out: Path, tmp: Path) -> None:
    """OUT's compiled module runs (`effc run`) and agrees with ONNX Runtime on OUT's own model.onnx,
    so model.so, params.bin, codegen.json and model.onnx belong together."""
    x = np.random.default_rng(1).standard_normal((1, 4, 8)).astype(np.float32)
    np.savez(tmp / "x.npz", x=x)
    proc = effc("run", out, "--inputs", tmp / "x.npz", "-o", tmp / "y.npz")
    assert proc.returncode == 0, proc.stderr
    got = dict(np.load(tmp / "y.npz"))
    want = OrtRunner(onnx_model(out / "model.onnx"))({"x": x})
    assert deviation([got], [want]).max_rel < 1e-4


def onnx_model(path: Path):
    from effc.frontend.onnx import load

    return load(path)


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path
