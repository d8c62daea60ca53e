"""Shared fixtures: tiny ONNX models built with onnx.helper (fast, no torch)."""

from __future__ import annotations

import os

import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers import tiny_mlp_proto  # noqa: E402


@pytest.fixture
def tiny_onnx(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp_proto(), path)
    return path
