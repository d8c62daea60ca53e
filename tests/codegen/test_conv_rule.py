"""Convolutions and pooling on the CPU: conv_gemm (im2col + the matmul rule), the im2col and window
rules, sink_reshape (epilogues fused into the GEMM). Each case is compiled for llvm, compared with
ONNX Runtime at 1e-4 scale-relative error, and the build manifest must show which rule took each
kernel: no conv or pool may land on the fallback (or stay unscheduled)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.codegen.blocks import model_from_nodes
from tests.codegen.checks import compile_and_compare

pytest.importorskip("tvm")

TOL = 1e-4
UNSCHEDULED = ("fallback", "unscheduled")


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_model(n, c, size, o, k, stride, pad, dilation, groups, dims=2, epilogue="relu", seed=0):
    """Conv (+ bias) followed by ``epilogue``: relu, gelu (erf form, as exported), residual (+ x's
    1x1-projected twin: Add of two convs, then Relu) or none."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((o, c // groups, *[k] * dims)) / np.sqrt(c // groups * k ** dims)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "B")]
    attrs = dict(strides=[stride] * dims, pads=[pad] * (2 * dims), dilations=[dilation] * dims, group=groups)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], **attrs)]
    if epilogue == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif epilogue == "gelu":
        inits.append(numpy_helper.from_array(np.float32(0.5 ** 0.5), "rs2"))
        inits += [numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(0.5), "half")]
        nodes += [helper.make_node("Mul", ["c", "rs2"], ["cs"]), helper.make_node("Erf", ["cs"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["c", "e1"], ["g"]),
                  helper.make_node("Mul", ["g", "half"], ["y"])]
    elif epilogue == "residual":
        w2 = (rng.standard_normal((o, c, *[1] * dims)) / np.sqrt(c)).astype(np.float32)
        inits.append(numpy_helper.from_array(w2, "W2"))
        nodes += [helper.make_node("Conv", ["x", "W2"], ["c2"], strides=[stride] * dims),
                  helper.make_node("Add", ["c", "c2"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    out = _out_size(size, k, stride, pad, dilation)
    if epilogue == "residual":
        assert out == _out_size(size, 1, stride, 0, 1), "the residual branch must match the conv's output"
    return model_from_nodes(nodes, [("x", [n, c] + [size] * dims)], [("y", [n, o] + [out] * dims)], inits)


def _compile_and_compare(model, tmp_path):
    return compile_and_compare(model, tmp_path, TOL).kernels


def _assert_scheduled(kernels, *names):
    """Every kernel whose name contains one of ``names`` exists and is on a real rule."""
    for name in names:
        hits = {k: r for k, r in kernels.items() if name in k}
        assert hits, f"no {name} kernel in {kernels}"
        assert not set(hits.values()) & set(UNSCHEDULED), kernels


CONV2D = [  # n, c, size, o, k, stride, pad, dilation, groups, epilogue
    (1, 16, 13, 32, 3, 1, 1, 1, 1, "relu"),
    (2, 16, 13, 24, 3, 2, 1, 1, 1, "relu"),
    (2, 8, 28, 16, 7, 2, 3, 1, 1, "none"),  # a ResNet stem: 7x7 stride 2
    (1, 12, 7, 20, 3, 1, 2, 2, 1, "gelu"),  # dilated
    (2, 16, 13, 32, 3, 1, 1, 1, 4, "relu"),  # grouped
    (2, 8, 7, 16, 1, 1, 0, 1, 1, "residual"),  # pointwise: no im2col
    (1, 8, 13, 16, 3, 2, 1, 1, 1, "residual"),  # a ResNet downsampling block (1x1 stride-2 shortcut)
    # pixels as the GEMM's rows (ConvShape.pixel_rows): 7 x 7 and 9 x 9 are no multiple of 32
    (2, 16, 7, 32, 3, 1, 1, 1, 1, "residual"),
    (2, 16, 9, 64, 3, 1, 1, 1, 2, "relu"),
    (2, 24, 7, 32, 1, 1, 0, 1, 1, "gelu"),
]


@pytest.mark.parametrize("n,c,size,o,k,stride,pad,dilation,groups,epilogue", CONV2D)
def test_conv2d_as_gemm(tmp_path, n, c, size, o, k, stride, pad, dilation, groups, epilogue):
    kernels = _compile_and_compare(_conv_model(n, c, size, o, k, stride, pad, dilation, groups,
                                               epilogue=epilogue), tmp_path)
    _assert_scheduled(kernels, "conv_gemm")
    assert all(r == "matmul" for k_, r in kernels.items() if "conv_gemm" in k_), kernels
    # a strided gather is a kernel of its own, and so is one whose pixels are the GEMM's rows (a
    # pixel count that 32-wide tiles pad by over 1/8, o no: col is read in place); else it runs in the packing of col
    pixels = _out_size(size, k, stride, pad, dilation) ** 2
    pixel_rows = (-pixels) % 32 > pixels / 8 and (o // groups) % 32 == 0
    assert any(r == "im2col" for r in kernels.values()) == (stride > 1 or pixel_rows and k > 1), kernels
    if groups == 1:  # the epilogue runs in the GEMM's write-back, no kernel of its own
        assert all("conv_gemm" in k_ or r == "im2col" or "reshape" in k_ and "add" not in k_
                   for k_, r in kernels.items()), kernels


DIRECT = [  # n, c, size, o, k, stride, pad, dims: a few input channels (ConvShape.direct)
    (1, 3, 64, 8, 7, 2, 3, 2),  # an RGB stem, 7x7 stride 2: rows of two vectors, planes in blocks
    (2, 3, 29, 6, 3, 1, 1, 2),  # odd sizes, stride 1, several images
    (1, 3, 150, 4, 3, 1, 1, 2),  # rows of 10 vectors (the last masked), 5 side by side
    (2, 1, 203, 8, 10, 5, 0, 1),  # a waveform front end (wav2vec's first conv)
    (1, 4, 67, 5, 3, 2, 1, 1),
]


@pytest.mark.parametrize("n,c,size,o,k,stride,pad,dims", DIRECT)
def test_direct_conv_on_window_rule(tmp_path, n, c, size, o, k, stride, pad, dims):
    """A conv with a few input channels is no GEMM: the window rule convolves it directly, the ReLU in
    its epilogue; no im2col and no GEMM kernel."""
    kernels = _compile_and_compare(_conv_model(n, c, size, o, k, stride, pad, 1, 1, dims=dims), tmp_path)
    assert list(kernels.values()) == ["window"] and "conv" in next(iter(kernels)), kernels


@pytest.mark.parametrize("n,c,size,stride,epilogue", [(1, 80, 37, 1, "gelu"), (2, 24, 37, 2, "gelu"),
                                                      (2, 8, 13, 2, "relu")])
def test_conv1d_audio_front_end(tmp_path, n, c, size, stride, epilogue):
    """Whisper's stem: Conv1d kernel 3, padding 1, stride 1 or 2, then GELU (fused into the GEMM)."""
    kernels = _compile_and_compare(_conv_model(n, c, size, 32, 3, stride, 1, 1, 1, dims=1, epilogue=epilogue),
                                   tmp_path)
    gemms = [k for k in kernels if "conv_gemm" in k]
    assert len(gemms) == 1 and kernels[gemms[0]] == "matmul" and "erf" in gemms[0] or epilogue != "gelu", kernels
    _assert_scheduled(kernels, "conv_gemm", *(["im2col"] if stride > 1 else []))


@pytest.mark.parametrize("n,c,size,k,stride,pad,dims", [(1, 16, 13, 3, 1, 1, 2), (2, 12, 28, 3, 2, 1, 2),
                                                        (1, 4, 24, 7, 1, 3, 2),  # rows of 3 half vectors
                                                        (2, 8, 7, 5, 1, 2, 2), (1, 16, 37, 3, 2, 1, 1)])
def test_depthwise_conv_on_window_rule(tmp_path, n, c, size, k, stride, pad, dims):
    kernels = _compile_and_compare(_conv_model(n, c, size, c, k, stride, pad, 1, c, dims=dims), tmp_path)
    conv = [k_ for k_ in kernels if "conv" in k_]
    assert conv and all(kernels[k_] == "window" for k_ in conv), kernels


def _pool_model(kind, n, c, size, k=3, stride=2, pad=1, dims=2):
    attrs = {} if kind.startswith("Global") else dict(kernel_shape=[k] * dims, strides=[stride] * dims,
                                                      pads=[pad] * (2 * dims))
    out = 1 if kind.startswith("Global") else _out_size(size, k, stride, pad, 1)
    return model_from_nodes([helper.make_node(kind, ["x"], ["y"], **attrs)], [("x", [n, c] + [size] * dims)],
                            [("y", [n, c] + [out] * dims)])


@pytest.mark.parametrize("kind,n,size,k,stride,pad,dims", [
    ("MaxPool", 1, 28, 3, 2, 1, 2), ("MaxPool", 2, 13, 3, 1, 1, 2), ("MaxPool", 2, 13, 2, 2, 0, 1),
    ("AveragePool", 2, 13, 3, 2, 1, 2), ("AveragePool", 1, 7, 2, 1, 0, 2)])
def test_pooling_on_window_rule(tmp_path, kind, n, size, k, stride, pad, dims):
    kernels = _compile_and_compare(_pool_model(kind, n, 8, size, k, stride, pad, dims), tmp_path)
    assert list(kernels.values()) == ["window"], kernels


@pytest.mark.parametrize("n,size", [(1, 7), (2, 13)])
def test_global_average_pool(tmp_path, n, size):
    kernels = _compile_and_compare(_pool_model("GlobalAveragePool", n, 32, size), tmp_path)
    assert kernels and not set(kernels.values()) & {"unscheduled"}, kernels


def test_conv_batchnorm_relu_unfolded(tmp_path):
    """A BatchNormalization the exporter left after a conv (no fold-batchnorm pass): still right, and
    the conv is still a GEMM."""
    rng = np.random.default_rng(1)
    c, o = 8, 16
    inits = [numpy_helper.from_array((rng.standard_normal((o, c, 3, 3)) / 8).astype(np.float32), "W")]
    for name, value in [("scale", rng.uniform(0.5, 2, o)), ("bias", rng.standard_normal(o)),
                        ("mean", rng.standard_normal(o)), ("var", rng.uniform(0.5, 2, o))]:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    model = model_from_nodes(nodes, [("x", [2, c, 13, 13])], [("y", [2, o, 13, 13])], inits)
    kernels = _compile_and_compare(model, tmp_path)
    _assert_scheduled(kernels, "conv_gemm")
