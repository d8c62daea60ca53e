"""effc.LookupLinear: a linear replaced by table lookups (product quantization or sign hashing).

    Y = sum_c s[c] * w_c(x) * float(tables[c, code_c(x), :]) + bias

The input's last axis (K = C * v) is split into C chunks x_c of v dims; each chunk is encoded to
one of k codes, and its table row is looked up and summed:

- ``encoder="pq"``: ``encoder_const`` = centroids float32 [C, k, v];
  code_c(x) = argmin_j ||x_c - centroids[c, j]||^2 (the first index on ties), w_c = 1.
- ``encoder="hash"``: ``encoder_const`` = centres float32 [C, v], k = 2^v;
  code_c(x) = sum_i [x_c[i] - centres[c, i] > 0] * 2^i. With ``soft=1`` the row is weighted by
  MemoryFormer's w_c = prod_i sigmoid(2 |x_c[i] - centres[c, i]|); with ``soft=0``, w_c = 1.

Inputs: ``X`` float32 [..., K], ``encoder_const``, ``tables`` int8 or float32 [C, k, N],
``table_scale`` float32 [C] (all ones for float tables), ``bias`` float32 [N]. Output [..., N].
Attributes: ``encoder`` ("pq" | "hash"), ``v`` (the chunk size), ``soft`` (0/1, hash only).

The function body takes the encoder from the rank of ``encoder_const`` (3: pq, 2: hash), which
:func:`check_node` holds to the ``encoder`` attribute, so one function serves both without an If.
It sums the rows as a one-hot [M, C*k] x [C*k, N] product: the reference semantics in standard
ops, cheap enough for ONNX Runtime; kernels never build it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from effc.errors import EffcError
from effc.ops import DOMAIN
from effc.ops.registry import CustomOp, register

NAME = "LookupLinear"
ENCODERS = ("pq", "hash")
TABLE_DTYPES = (np.int8, np.float32)
MIN_OPSET = 15  # Shape(start, end)
MAX_HASH_BITS = 8  # k = 2^v <= 256 codes

_BODY = """
<domain: "effc", opset_import: ["" : {opset}]>
LookupLinear <encoder, v, soft> (X, encoder_const, tables, table_scale, bias) => (Y)
{{
    last = Constant <value = int64[1] {{-1}}> ()
    first = Constant <value = int64[1] {{0}}> ()
    second = Constant <value = int64[1] {{1}}> ()
    third = Constant <value = int64[1] {{2}}> ()
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    rank_two = Constant <value_int = 2> ()
    zero_f = Constant <value = float[1] {{0.0}}> ()
    one_f = Constant <value = float[1] {{1.0}}> ()
    two_f = Constant <value = float[1] {{2.0}}> ()
    soft_flag = Constant <value_int: int = @soft> ()
    c_dim = Shape <end = 1> (tables)
    k_dim = Shape <start = 1, end = 2> (tables)
    n_dim = Shape <start = 2> (tables)
    v_dim = Shape <start = -1> (encoder_const)
    chunk_shape = Concat <axis = 0> (last, c_dim, v_dim)
    chunks = Reshape (X, chunk_shape)
    grid_shape = Concat <axis = 0> (c_dim, last, v_dim)
    grid = Reshape (encoder_const, grid_shape)
    wide = Unsqueeze (chunks, third)
    diff = Sub (wide, grid)
    square = Mul (diff, diff)
    distance = ReduceSum <keepdims = 0> (square, last)
    nearest = ArgMin <axis = 2, keepdims = 0> (distance)
    centre_row = Gather <axis = 1> (grid, first)
    centre = Squeeze (centre_row, second)
    z = Sub (chunks, centre)
    positive = Greater (z, zero_f)
    bits = Cast <to = 7> (positive)
    v_count = Squeeze (v_dim, first)
    exponents = Range (zero, v_count, one)
    exponents_f = Cast <to = 1> (exponents)
    powers_f = Pow (two_f, exponents_f)
    powers = Cast <to = 7> (powers_f)
    weighted_bits = Mul (bits, powers)
    signs = ReduceSum <keepdims = 0> (weighted_bits, last)
    const_shape = Shape (encoder_const)
    rank = Size (const_shape)
    is_hash = Equal (rank, rank_two)
    code = Where (is_hash, signs, nearest)
    magnitude = Abs (z)
    doubled = Mul (magnitude, two_f)
    gate = Sigmoid (doubled)
    {reduce_prod}
    soft_b = Cast <to = 9> (soft_flag)
    use_soft = And (soft_b, is_hash)
    weight = Where (use_soft, soft_weight, one_f)
    scaled = Mul (weight, table_scale)
    k_count = Squeeze (k_dim, first)
    all_codes = Range (zero, k_count, one)
    code_col = Unsqueeze (code, last)
    hit = Equal (code_col, all_codes)
    hit_f = Cast <to = 1> (hit)
    scaled_col = Unsqueeze (scaled, last)
    mix = Mul (hit_f, scaled_col)
    rows = Mul (c_dim, k_dim)
    mix_shape = Concat <axis = 0> (last, rows)
    flat_mix = Reshape (mix, mix_shape)
    table_shape = Concat <axis = 0> (rows, n_dim)
    flat_tables = Reshape (tables, table_shape)
    tables_f = Cast <to = 1> (flat_tables)
    summed = MatMul (flat_mix, tables_f)
    biased = Add (summed, bias)
    lead = Shape <end = -1> (X)
    y_shape = Concat <axis = 0> (lead, n_dim)
    Y = Reshape (biased, y_shape)
}}
"""


def function(opset: int) -> ir.Function:
    """The op's ONNX function, importing the default domain at ``opset`` (the model's own)."""
    if opset < MIN_OPSET:
        raise ValueError(f"{NAME} needs opset >= {MIN_OPSET}, got {opset}")
    # ReduceProd takes its axes as an input from opset 18, as an attribute before
    reduce_prod = ("soft_weight = ReduceProd <keepdims = 0> (gate, last)" if opset >= 18
                   else "soft_weight = ReduceProd <keepdims = 0, axes = [-1]> (gate)")
    proto = onnx.parser.parse_function(_BODY.format(opset=opset, reduce_prod=reduce_prod))
    assert proto.domain == DOMAIN
    return ir.serde.deserialize_function(proto)


def output_shape(x_shape: list, tables_shape: list) -> list:
    """Shape rule: [..., K] x [C, k, N] -> [..., N]."""
    return list(x_shape[:-1]) + [tables_shape[2]]


# --- the numpy reference -------------------------------------------------------------------

def encode(x: np.ndarray, encoder: str, encoder_const: np.ndarray) -> np.ndarray:
    """Codes int64 [M, C] of rows x [M, K] (K = C * v)."""
    chunks_count, v = encoder_const.shape[0], encoder_const.shape[-1]
    chunks = x.reshape(x.shape[0], chunks_count, v)
    if encoder == "pq":
        distance = ((chunks[:, :, None, :] - encoder_const[None]) ** 2).sum(axis=-1)
        return distance.argmin(axis=-1)  # numpy's argmin takes the first index on ties
    bits = (chunks - encoder_const[None] > 0).astype(np.int64)
    return (bits << np.arange(v)).sum(axis=-1)


def soft_weights(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """MemoryFormer's weight of each looked-up row, float [M, C]: prod_i sigmoid(2 |z_i|)."""
    chunks = x.reshape(x.shape[0], centres.shape[0], centres.shape[1])
    z = np.abs(chunks - centres[None]).astype(np.float64)
    return np.prod(1.0 / (1.0 + np.exp(-2.0 * z)), axis=-1)


def reference(x: np.ndarray, encoder_const: np.ndarray, tables: np.ndarray, table_scale: np.ndarray,
              bias: np.ndarray, encoder: str, soft: int = 0) -> np.ndarray:
    """Numpy semantics of the op (rows summed in float64)."""
    rows = x.reshape(-1, x.shape[-1])
    codes = encode(rows, encoder, encoder_const)
    weight = soft_weights(rows, encoder_const) if encoder == "hash" and soft else None
    y = lookup_sum(codes, weight, tables, table_scale, bias)
    return y.astype(x.dtype).reshape(*x.shape[:-1], tables.shape[2])


def lookup_sum(codes: np.ndarray, weight: np.ndarray | None, tables: np.ndarray, table_scale: np.ndarray,
               bias: np.ndarray) -> np.ndarray:
    """float64 [M, N]: sum_c table_scale[c] * weight[:, c] * tables[c, codes[:, c]] + bias (weight None: 1)."""
    scale = table_scale.astype(np.float64)
    y = np.zeros((len(codes), tables.shape[2])) + bias
    for c in range(tables.shape[0]):  # a chunk at a time: [M, C, N] would not fit for large layers
        w = scale[c] if weight is None else scale[c] * weight[:, c, None]
        y += w * tables[c, codes[:, c]]
    return y


def table_bytes(encoder_const: np.ndarray, tables: np.ndarray, table_scale: np.ndarray) -> int:
    """Every stored byte of the op's constants but the bias."""
    return int(encoder_const.nbytes + tables.nbytes + table_scale.nbytes)


# --- codegen: checks and the registration ---------------------------------------------------

def check_node(name: str, node: ir.Node, constants: list) -> None:
    """One-line EffcError for a node that is not the op: its arity, attributes, or constants
    (``constants``: the values of encoder_const, tables and table_scale, None where not constant)
    that do not follow the layout above."""
    if len(node.inputs) != 5 or any(v is None for v in node.inputs):
        raise EffcError(f"{name}: {NAME} needs 5 inputs (X, encoder_const, tables, table_scale, bias), "
                        f"got {len(node.inputs)}")
    encoder = node.attributes.get_string("encoder", "")
    v = node.attributes.get_int("v", 0)
    soft = node.attributes.get_int("soft", 0)
    if encoder not in ENCODERS or v < 1 or soft not in (0, 1) or (soft and encoder != "hash"):
        raise EffcError(f"{name}: {NAME} needs encoder in {ENCODERS}, v >= 1 and soft 0/1 (hash only); "
                        f"got encoder={encoder!r}, v={v}, soft={soft}")
    problem = layout_problem(encoder, v, *constants)
    if problem:
        raise EffcError(f"{name}: {problem}")
    dims = list(node.inputs[0].shape or [])
    tables = constants[1]
    if tables is not None and dims and isinstance(dims[-1], int) and dims[-1] != tables.shape[0] * v:
        raise EffcError(f"{name}: X has K={dims[-1]} but {tables.shape[0]} chunks of {v} make {tables.shape[0] * v}")


def layout_problem(encoder: str, v: int, encoder_const: np.ndarray | None, tables: np.ndarray | None,
                   table_scale: np.ndarray | None) -> str | None:
    """Why the constants do not make a LookupLinear with this encoder and chunk size, or None."""
    if encoder_const is None or tables is None or table_scale is None:
        return None
    rank = 3 if encoder == "pq" else 2
    if encoder_const.dtype != np.float32 or encoder_const.ndim != rank or encoder_const.shape[-1] != v:
        want = "centroids float32 [C, k, v]" if encoder == "pq" else "centres float32 [C, v]"
        return f"{encoder} needs {want} with v={v}, got {encoder_const.dtype}{list(encoder_const.shape)}"
    if tables.dtype not in TABLE_DTYPES or tables.ndim != 3:
        return f"tables must be int8 or float32 [C, k, N], got {tables.dtype}{list(tables.shape)}"
    codes = encoder_const.shape[1] if encoder == "pq" else 2 ** v
    if encoder == "hash" and v > MAX_HASH_BITS:
        return f"hash chunks of {v} dims need 2^{v} codes (at most 2^{MAX_HASH_BITS})"
    if tables.shape[:2] != (encoder_const.shape[0], codes):
        return f"tables {list(tables.shape)} do not match {encoder_const.shape[0]} chunks of {codes} codes"
    if table_scale.dtype != np.float32 or table_scale.shape != (tables.shape[0],):
        return f"table_scale must be float32 [{tables.shape[0]}], got {table_scale.dtype}{list(table_scale.shape)}"
    return None


# Lookup kernels (effc/kernels/lookup_*): each node is a call of one of them with its encoder constants
# and tables packed at compile time (never a dense weight); a node that does not fit runs its function body.
register(CustomOp(DOMAIN, NAME, function, packed=(1, 2, 3), rule="lookup", fallback="function",
                  check=check_node, targets={"llvm": "effc.kernels.lookup_cpu:KERNELS",
                                             "cuda": "effc.kernels.lookup_cuda:KERNELS"}))
