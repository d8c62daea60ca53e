"""Run a kernel test's cases in a fresh process with EFFC_AMX set: the tile kernels choose AMX or
their vector path once per process (effc/kernels/amx.h)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cases_in_child(module: str, amx: str):
    """``module``.run_cases() (JSON-able) from a process with EFFC_AMX=``amx``."""
    code = f"import json; from {module} import run_cases; print(json.dumps(run_cases()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "EFFC_AMX": amx}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])
