"""effc.ShiftAddMatMul: a linear whose weight is a sum of binary planes with power-of-two scales.

    Y = X @ W^T + bias,   W[n, k] = sum_i alpha[i, n, k // g] * b[i, n, k],   b in {-1, +1}

Inputs (the packed layout the kernels read):
- ``X``      float [..., K]
- ``planes`` uint8 [q, N, K/8]: bit t of byte j of plane i, row n is b[i, n, 8j + t]
  (LSB first; 1 means +1, 0 means -1), so one byte indexes a 256-entry table of signed sums
  of 8 consecutive activations.
- ``codes``  int8 [q, N, K/g, T]: each scale alpha is a sum of T signed powers of two; a code
  c encodes the term sign(c) * 2^(|c| - 64) (c = 0: no term), so the sign and the exponent of a
  term share one byte and multiplying by a term is an exponent add. g = K / codes.shape[2].
- ``bias``   float [N]
Output ``Y`` [..., N].
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from effc.errors import EffcError
from effc.ops import DOMAIN
from effc.ops.registry import CustomOp, register

NAME = "ShiftAddMatMul"
EXPONENT_BIAS = 64
MIN_EXPONENT, MAX_EXPONENT = 1 - EXPONENT_BIAS, 127 - EXPONENT_BIAS

_BODY = """
<domain: "effc", opset_import: ["" : {opset}]>
ShiftAddMatMul (X, planes, codes, bias) => (Y)
{{
    last = Constant <value = int64[1] {{-1}}> ()
    first = Constant <value = int64[1] {{0}}> ()
    row_major = Constant <value = int64[2] {{0, -1}}> ()
    shifts = Constant <value = uint8[8] {{0, 1, 2, 3, 4, 5, 6, 7}}> ()
    two_bits = Constant <value = uint8[1] {{2}}> ()
    one = Constant <value = float[1] {{1.0}}> ()
    two = Constant <value = float[1] {{2.0}}> ()
    bias_exp = Constant <value = float[1] {{{bias}.0}}> ()
    bytes = Unsqueeze (planes, last)
    shifted = BitShift <direction = "RIGHT"> (bytes, shifts)
    bits = Mod (shifted, two_bits)
    bits_f = Cast <to = 1> (bits)
    doubled = Mul (bits_f, two)
    signs = Sub (doubled, one)
    lead = Shape <end = 3> (codes)
    group_shape = Concat <axis = 0> (lead, last)
    grouped = Reshape (signs, group_shape)
    codes_f = Cast <to = 1> (codes)
    magnitude = Abs (codes_f)
    exponent = Sub (magnitude, bias_exp)
    power = Pow (two, exponent)
    term_sign = Sign (codes_f)
    terms = Mul (term_sign, power)
    alpha = ReduceSum <keepdims = 1> (terms, last)
    scaled = Mul (grouped, alpha)
    summed = ReduceSum <keepdims = 0> (scaled, first)
    dense = Reshape (summed, row_major)
    dense_x = CastLike (dense, X)
    weight = Transpose <perm = [1, 0]> (dense_x)
    product = MatMul (X, weight)
    Y = Add (product, bias)
}}
"""


MIN_OPSET = 15  # Shape(end=), CastLike; bits come out through Mod, as BitwiseAnd needs opset 18


def function(opset: int) -> ir.Function:
    """The op's ONNX function, importing the default domain at ``opset`` (the model's own)."""
    if opset < MIN_OPSET:
        raise ValueError(f"{NAME} needs opset >= {MIN_OPSET}, got {opset}")
    proto = onnx.parser.parse_function(_BODY.format(opset=opset, bias=EXPONENT_BIAS))
    assert proto.domain == DOMAIN
    return ir.serde.deserialize_function(proto)


def output_shape(x_shape: list, planes_shape: list) -> list:
    """Shape rule: [..., K] x [q, N, K/8] -> [..., N]."""
    return list(x_shape[:-1]) + [planes_shape[1]]


# --- packing and the numpy reference -------------------------------------------------------

def pack_planes(signs: np.ndarray) -> np.ndarray:
    """[q, N, K] of +-1 -> uint8 [q, N, K/8] (LSB first; K must be a multiple of 8)."""
    bits = (np.asarray(signs) > 0).astype(np.uint8)
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_planes(planes: np.ndarray) -> np.ndarray:
    """uint8 [q, N, K/8] -> float64 [q, N, K] of +-1."""
    return np.unpackbits(planes, axis=-1, bitorder="little").astype(np.float64) * 2.0 - 1.0


def encode_terms(signs: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """Signed power-of-two terms (sign in {-1, 0, +1}, integer exponent) -> int8 codes."""
    exponents = np.asarray(exponents)
    if np.any((signs != 0) & ((exponents < MIN_EXPONENT) | (exponents > MAX_EXPONENT))):
        raise ValueError(f"exponent outside [{MIN_EXPONENT}, {MAX_EXPONENT}]")
    return (np.sign(signs) * (exponents + EXPONENT_BIAS) * (signs != 0)).astype(np.int8)


def decode_scales(codes: np.ndarray) -> np.ndarray:
    """int8 [q, N, G, T] -> float64 scales [q, N, G]."""
    c = codes.astype(np.float64)
    return (np.sign(c) * np.exp2(np.abs(c) - EXPONENT_BIAS)).sum(axis=-1)


def dense_weight(planes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The [N, K] float64 weight the packed form stands for."""
    signs = unpack_planes(planes)
    q, n, k = signs.shape
    groups = codes.shape[2]
    scales = decode_scales(codes)
    return (signs.reshape(q, n, groups, k // groups) * scales[..., None]).sum(axis=0).reshape(n, k)


def reference(x: np.ndarray, planes: np.ndarray, codes: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Numpy semantics of the op (weight rebuilt in float64, exact for power-of-two scales)."""
    weight = dense_weight(planes, codes).astype(x.dtype)
    return x @ weight.T + bias


def storage_bits(planes: np.ndarray, codes: np.ndarray) -> int:
    """Every stored bit of the quantized weight: planes plus scale codes (bias excluded)."""
    return int(planes.size * 8 + codes.size * 8)


# --- codegen: checks and the registration ---------------------------------------------------

def check_node(name: str, node: ir.Node, constants: list) -> None:
    """One-line EffcError for a node that is not the op (arity, or planes/codes that do not follow
    the layout above, given as ``constants``: their values, None where not constant)."""
    if len(node.inputs) != 4 or any(v is None for v in node.inputs):
        raise EffcError(f"{name}: {NAME} needs 4 inputs (X, planes, codes, bias), got {len(node.inputs)}")
    planes, codes = constants
    if planes is None or codes is None:
        return
    if planes.dtype != np.uint8 or codes.dtype != np.int8 or planes.ndim != 3 or codes.ndim != 4:
        raise EffcError(f"{name}: {NAME} needs uint8 planes [q, N, K/8] and int8 codes [q, N, K/g, T] "
                        f"(got {planes.dtype}{list(planes.shape)}, {codes.dtype}{list(codes.shape)})")
    k = planes.shape[2] * 8
    if codes.shape[:2] != planes.shape[:2] or k % codes.shape[2]:
        raise EffcError(f"{name}: codes {list(codes.shape)} do not match planes {list(planes.shape)}")
    dims = list(node.inputs[0].shape or [])
    if dims and isinstance(dims[-1], int) and dims[-1] != k:
        raise EffcError(f"{name}: X has K={dims[-1]} but the packed weight has K={k}")


# Lookup-table kernels (effc/kernels/shift_add_*): each node that fits is a call of one of them with
# its planes/codes packed at compile time; any other node runs its function body, whose weight TVM
# folds into a dense matrix at compile time.
register(CustomOp(DOMAIN, NAME, function, packed=(1, 2), rule="shift-add-lut", fallback="dense", check=check_node,
                  targets={"llvm": "effc.kernels.shift_add_cpu:KERNELS",
                           "cuda": "effc.kernels.shift_add_cuda:KERNELS"}))
