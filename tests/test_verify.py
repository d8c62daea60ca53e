"""effc.verify.deviation: the error measure every pass report and codegen check rests on."""

from __future__ import annotations

import numpy as np

from effc.verify import deviation


def test_deviation_is_scale_relative():
    ref = {"y": np.array([2.0, -4.0], np.float32)}
    dev = deviation([{"y": np.array([2.0, -3.0], np.float32)}], [ref])
    assert dev.max_abs == 1.0 and dev.max_rel == 0.25


def test_nan_in_one_output_is_an_infinite_error():
    # NaN compares false, so a plain max() over differences would report 0 for an all-NaN output.
    ref = {"y": np.array([1.0, 2.0], np.float32)}
    for got in (np.array([np.nan, np.nan], np.float32), np.array([1.0, np.nan], np.float32)):
        dev = deviation([{"y": got}], [ref])
        assert dev.max_rel == float("inf") and dev.cosine == 0.0
    assert deviation([{"y": np.array([1.0, 2.0], np.float32)}], [{"y": np.array([1.0, np.nan], np.float32)}]
                     ).max_rel == float("inf")


def test_nan_where_the_reference_has_nan_too_agrees():
    both = np.array([1.0, np.nan, np.inf], np.float32)
    assert deviation([{"y": both.copy()}], [{"y": both}]).max_rel == 0.0
