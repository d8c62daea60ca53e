"""The ``slow`` marker selects what it says: every test on a large zoo model, and nothing else."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import SLOW_ZOO

FILES = ("tests/test_acceptance.py", "tests/zoo/test_hf_models.py")  # the tests that load zoo models by name


def _collected(marker: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker, *FILES],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line]


def _on_a_large_model(test_id: str) -> bool:
    return any(f"[{name}]" in test_id for name in SLOW_ZOO)


def test_slow_selects_the_large_zoo_model_tests_and_not_slow_leaves_them_out():
    slow, fast = _collected("slow"), _collected("not slow")
    large = [t for t in slow + fast if _on_a_large_model(t)]
    assert large and set(large) <= set(slow), sorted(set(large) - set(slow))
    assert fast and not any(_on_a_large_model(t) for t in fast)
