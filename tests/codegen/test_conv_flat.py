"""conv_gemm's flat gather (ConvShape.shifted): a stride-1 conv's input zero-padded once, col's rows
read in place by the matmul rule as shifted slices of it, junk columns cropped after the GEMM.
Compared with ONNX Runtime at 1e-4 scale-relative error; small shapes take the path by a raised
junk limit (MAX_JUNK), so odd sizes, padding 0, dilation and groups are covered cheaply."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from effc.codegen import conv_gemm
from tests.codegen.blocks import model_from_nodes
from tests.codegen.checks import compile_and_compare

pytest.importorskip("tvm")

TOL = 1e-4


def _conv(n, c, hw, o, k, pad, dilation, groups, residual=False, seed=0):
    """Conv (+ bias) + Relu on an n x c x *hw input (1-D or 2-D); ``residual``: + the input first."""
    rng = np.random.default_rng(seed)
    dims = len(hw)
    w = (rng.standard_normal((o, c // groups, *[k] * dims)) / np.sqrt(c // groups * k ** dims)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "B")]
    out = [s + 2 * pad - dilation * (k - 1) for s in hw]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[pad] * (2 * dims), dilations=[dilation] * dims,
                              group=groups)]
    if residual:  # a basic block's second conv: + the block input, then Relu (c == o, same size)
        nodes.append(helper.make_node("Add", ["c", "x"], ["s"]))
    nodes.append(helper.make_node("Relu", ["s" if residual else "c"], ["y"]))
    return model_from_nodes(nodes, [("x", [n, c, *hw])], [("y", [n, o, *out])], inits)


def _compile_and_compare(model, tmp_path):
    return compile_and_compare(model, tmp_path, TOL).kernels


CASES = [  # n, c, spatial, o, k, pad, dilation, groups, residual
    (2, 16, (13, 11), 16, 3, 1, 1, 1, True),  # odd sizes, several images, + the residual
    (1, 16, (12, 9), 24, 3, 0, 1, 1, False),  # no padding (o 24: pixels stay the columns)
    (2, 12, (11, 13), 32, 3, 2, 2, 1, False),  # dilated: taps 2 apart, 2 rows of zeros
    (2, 16, (9, 10), 32, 3, 1, 1, 2, False),  # two groups
    (1, 8, (10, 7), 16, 5, 2, 1, 1, False),  # 5 x 5
]


@pytest.mark.parametrize("n,c,hw,o,k,pad,dilation,groups,residual", CASES)
def test_flat_gather_matches_ort(tmp_path, monkeypatch, n, c, hw, o, k, pad, dilation, groups, residual):
    monkeypatch.setattr(conv_gemm, "MAX_JUNK", 10.0)
    kernels = _compile_and_compare(_conv(n, c, hw, o, k, pad, dilation, groups, residual), tmp_path)
    # the padding is a kernel of its own, the GEMM reads it in place: no im2col kernel, no packing
    assert any("conv_pad" in name for name in kernels), kernels
    assert not any(rule in ("im2col", "fallback") for rule in kernels.values()), kernels
    assert [rule for name, rule in kernels.items() if "conv_gemm" in name] == ["matmul"], kernels


def test_flat_gather_taken_where_junk_is_small():
    """56 x 56 (ResNet's first stage): 2 junk columns of 58, taken; 28 x 28 (30 wide: 10% junk
    with the tail), 7 x 7 (pixels as rows), strided convs and conv1d keep the packed gather."""
    from types import SimpleNamespace

    def shape(c, size, stride=1):  # the conv attributes ConvShape reads
        attrs = SimpleNamespace(groups=1, strides=[stride] * 2, dilation=[1, 1], padding=[1] * 4)
        return conv_gemm.ConvShape([1, c, size, size], [c, c, 3, 3], attrs)

    assert shape(64, 56).shifted and shape(64, 56).flat_pixels == 56 * 58 + 16
    assert not shape(128, 28).shifted and not shape(512, 7).shifted and not shape(64, 56, 2).shifted
    conv1d = conv_gemm.ConvShape([1, 80, 3000], [384, 80, 3], SimpleNamespace(groups=1, strides=[1], dilation=[1],
                                                                            padding=[1, 1]))
    assert not conv1d.shifted  # 2-D only (the audio stem's conv1 was as fast either way)
