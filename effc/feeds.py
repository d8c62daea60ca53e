"""Seeded inputs that a model's operators accept: indices within the indexed axis, nonzero divisors,
shape-like inputs that keep the data's shape. `verify.make_inputs` asks here first for each graph
input; None means no operator constrains it (normal floats, small integers).

Each rule looks at one consumer (node, input index) of the graph input; the first that applies wins.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ir import const_value


def constrained(value: ir.Value, shape: list[int], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray | None:
    for node, index in value.uses():
        rule = _RULES.get((node.op_type, index)) if node.domain in ("", "ai.onnx") else None
        if rule is not None:
            array = rule(node, shape, dtype, rng)
            if array is not None:
                return np.asarray(array).astype(dtype).reshape(shape)
    return None


def _dims(value: ir.Value | None) -> list[int] | None:
    """The static dims of ``value`` (a constant's or its inferred shape), or None."""
    if value is None:
        return None
    array = const_value(value)
    if array is not None:
        return list(array.shape)
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return list(value.shape)


def _axis_dim(node: ir.Node, default_axis: int = 0) -> int | None:
    dims = _dims(node.inputs[0])
    if not dims:
        return None
    axis = node.attributes.get_int("axis", default_axis)
    return dims[axis] if -len(dims) <= axis < len(dims) else None


def _indices_on_axis(node, shape, dtype, rng):
    """Gather / GatherElements / ScatterElements indices: within the axis they index."""
    bound = _axis_dim(node)
    return rng.integers(0, bound, size=shape) if bound else None


def _indices_nd(node, shape, dtype, rng):
    """GatherND / ScatterND indices: within the smallest indexed dim (safe for every indexed axis)."""
    dims = _dims(node.inputs[0])
    return rng.integers(0, min(dims), size=shape) if dims and min(dims) > 0 else None


def _nonzero(node, shape, dtype, rng):
    """Integer divisors (Div, Mod): 1 or 2, never zero."""
    return rng.integers(1, 3, size=shape) if np.issubdtype(dtype, np.integer) else None


def _ones(node, shape, dtype, rng):
    """Expand's shape, Tile's repeats, Slice's steps, Resize's scales: the identity value."""
    return np.ones(shape)


def _zeros(node, shape, dtype, rng):
    """Pad's pads, CumSum's axis, Slice's starts, Resize's roi."""
    return np.zeros(shape)


def _slice_ends(node, shape, dtype, rng):
    return np.full(shape, np.iinfo(np.int32).max)  # to the end of every sliced axis


def _leading_axes(node, shape, dtype, rng):
    """Slice's axes: distinct axes 0..k-1."""
    return np.arange(int(np.prod(shape))) if len(shape) <= 1 else None


def _data_shape(node, shape, dtype, rng):
    """Reshape's shape / Resize's sizes: the data's own shape when its rank matches, else (1, ..., -1)."""
    dims = _dims(node.inputs[0])
    length = int(np.prod(shape))
    if dims is not None and len(dims) == length:
        return np.array(dims)
    if node.op_type == "Reshape" and length >= 1:
        return np.array([1] * (length - 1) + [-1])
    return None


def _small_count(node, shape, dtype, rng):
    """ConstantOfShape's shape, TopK's k, OneHot's depth, NonMaxSuppression's max boxes: small, positive."""
    return np.full(shape, 2)


def _threshold(node, shape, dtype, rng):
    return np.full(shape, 0.5)


def _one_hot_indices(node, shape, dtype, rng):
    depth = const_value(node.inputs[1])
    return rng.integers(0, int(depth.reshape(-1)[0]) if depth is not None else 2, size=shape)


_RULES = {
    ("Gather", 1): _indices_on_axis, ("GatherElements", 1): _indices_on_axis,
    ("ScatterElements", 1): _indices_on_axis, ("GatherND", 1): _indices_nd, ("ScatterND", 1): _indices_nd,
    ("Div", 1): _nonzero, ("Mod", 1): _nonzero,
    ("Expand", 1): _ones, ("Tile", 1): _ones, ("Slice", 4): _ones, ("Resize", 2): _ones, ("Upsample", 1): _ones,
    ("Slice", 1): _zeros, ("Slice", 2): _slice_ends, ("Slice", 3): _leading_axes,
    ("Pad", 1): _zeros, ("CumSum", 1): _zeros, ("Resize", 1): _zeros,
    ("Reshape", 1): _data_shape, ("Resize", 3): _data_shape,
    ("ConstantOfShape", 0): _small_count, ("TopK", 1): _small_count, ("OneHot", 1): _small_count,
    ("NonMaxSuppression", 2): _small_count, ("NonMaxSuppression", 3): _threshold,
    ("NonMaxSuppression", 4): _zeros, ("OneHot", 0): _one_hot_indices,
    ("Range", 0): _zeros, ("Range", 1): lambda node, shape, dtype, rng: np.full(shape, 4), ("Range", 2): _ones,
}
