"""Differential checks: seeded inputs, ONNX Runtime execution and deviation metrics."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import const_value, in_memory_proto

# Symbolic dims get these sizes when no concrete shape is known.
DEFAULT_BATCH = 1
DEFAULT_DIM = 16
_BATCH_NAMES = ("batch", "n", "b", "bs", "batch_size")


@dataclass
class Deviation:
    """How far a model's outputs are from a reference.

    max_rel is per output tensor the largest absolute deviation divided by the largest
    reference magnitude (a scale-relative error that does not explode near zeros), then the
    maximum over outputs; cosine is the smallest per-output cosine similarity.
    """

    max_abs: float
    max_rel: float
    cosine: float

    def as_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "cosine": self.cosine}


def _flat(outputs: dict) -> dict:
    """Sequence outputs (lists of arrays) as one entry per element, so they compare like tensors."""
    flat = {}
    for name, value in outputs.items():
        if isinstance(value, (list, tuple)):
            flat[f"{name}.len"] = np.array(len(value))
            flat.update({f"{name}[{i}]": np.asarray(v) for i, v in enumerate(value)})
        else:
            flat[name] = np.asarray(value) if value is not None else np.array([])
    return flat


def deviation(outputs: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]) -> Deviation:
    max_abs = max_rel = 0.0
    cosine = 1.0
    for got, ref in zip(outputs, reference):
        got, ref = _flat(got), _flat(ref)
        for name, r in ref.items():
            if name not in got:
                raise EffcError(f"output '{name}' disappeared from the rewritten model")
            g = got[name]
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(g, r):
                    max_abs, max_rel, cosine = float("inf"), float("inf"), min(cosine, 0.0)
                continue
            g64, r64 = g.astype(np.float64).ravel(), r.astype(np.float64).ravel()
            if g64.shape != r64.shape:
                raise EffcError(f"output '{name}' changed shape {r.shape} -> {g.shape}")
            if not np.array_equal(np.isnan(g64), np.isnan(r64)):  # NaN compares false: max() would skip it
                max_abs, max_rel, cosine = float("inf"), float("inf"), min(cosine, 0.0)
                continue
            g64, r64 = np.nan_to_num(g64, nan=0.0), np.nan_to_num(r64, nan=0.0)  # NaN where both have it
            diff = float(np.max(np.abs(g64 - r64))) if r64.size else 0.0
            scale = float(np.max(np.abs(r64))) if r64.size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
            with np.errstate(over="ignore", invalid="ignore"):  # infinities: cosine undefined
                denom = float(np.linalg.norm(g64) * np.linalg.norm(r64))
                cos = float(np.dot(g64, r64) / denom) if denom > 0 else float("nan")
            if not np.isfinite(cos):
                cos = 1.0 if diff == 0 else 0.0
            cosine = min(cosine, cos)
    return Deviation(max_abs, max_rel, cosine)


def _gather_bound(value: ir.Value) -> int | None:
    """If ``value`` indexes a constant table (Gather indices), the table's row count."""
    for node in value.consumers():
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is value:
            table = const_value(node.inputs[0])
            if table is not None:
                axis = node.attributes.get_int("axis", 0)
                return int(table.shape[axis])
    return None


def concrete_shape(value: ir.Value, dims: dict[str, int] | None = None) -> list[int]:
    dims = dims or {}
    shape = []
    for d in value.shape or []:
        if isinstance(d, int):
            shape.append(d)
        else:
            name = str(d.value) if d.value is not None else ""
            shape.append(dims.get(name, DEFAULT_BATCH if name.lower() in _BATCH_NAMES else DEFAULT_DIM))
    return shape


def make_inputs(model: ir.Model, count: int = 2, seed: int = 0, dims: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Seeded inputs for every graph input: normal floats, in-range token ids, all-one masks, and
    values the consuming operators accept (effc/feeds.py). A model whose inputs effc cannot make
    (sequences, optionals, dtypes numpy lacks) is refused with a pointer to --inputs."""
    from effc.feeds import constrained

    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for value in model.graph.inputs:
            if value.is_initializer():
                continue
            shape = concrete_shape(value, dims)
            dtype = _feedable_dtype(value)
            name = (value.name or "").lower()
            special = constrained(value, shape, dtype, rng)
            if special is not None:
                feed[value.name] = special
            elif dtype == np.object_:
                feed[value.name] = np.full(shape, "effc", dtype=object)
            elif np.issubdtype(dtype, np.floating):
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_ or "mask" in name:
                feed[value.name] = np.ones(shape, dtype=dtype)
            elif "token_type" in name:
                feed[value.name] = np.zeros(shape, dtype=dtype)
            elif "position" in name and shape:
                feed[value.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            else:
                high = _gather_bound(value) or 2
                feed[value.name] = rng.integers(0, high, size=shape).astype(dtype)
        feeds.append(feed)
    return feeds


_NUMPY_KINDS = "biufcO?"  # numpy's own kinds: bool, ints, floats, complex, strings; not ml_dtypes' extensions


def _feedable_dtype(value: ir.Value) -> np.dtype:
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        kind = type(value.type).__name__.replace("Type", "").lower()
        raise EffcError(f"input '{value.name}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a "
                        "tensor: effc compiles models with tensor inputs only")
    if value.dtype is None:
        return np.dtype(np.float32)
    if value.dtype == ir.DataType.STRING:
        return np.dtype(object)
    try:
        dtype = np.dtype(value.dtype.numpy())
    except Exception:
        dtype = None
    if dtype is None or dtype.kind not in _NUMPY_KINDS or dtype.names is not None or dtype.kind == "V":
        raise EffcError(f"input '{value.name}' is {value.dtype.name}: ONNX Runtime's Python API takes no such "
                        "array, so effc cannot run this model to check it")
    return dtype


# An exact rewrite of the whole model (an opset upgrade) may differ from the original by this much.
EQUIVALENCE_TOLERANCE = 1e-4


def interface(model: ir.Model) -> tuple[list, list]:
    """(inputs, outputs) as (name, dtype, shape) with symbolic dims as None; initializers excluded."""
    def spec(v: ir.Value):
        shape = None if v.shape is None else tuple(d if isinstance(d, int) else None for d in v.shape)
        return v.name, v.dtype, shape
    return ([spec(v) for v in model.graph.inputs if not v.is_initializer()], [spec(v) for v in model.graph.outputs])


def interface_change(before: ir.Model, after: ir.Model) -> str | None:
    """Why ``after`` does not take and give what ``before`` does (names, dtypes, known dims), or None."""
    for kind, old, new in zip(("input", "output"), interface(before), interface(after)):
        if [n for n, _, _ in old] != [n for n, _, _ in new]:
            return f"{kind}s {[n for n, _, _ in old]} became {[n for n, _, _ in new]}"
        for (name, dt0, sh0), (_, dt1, sh1) in zip(old, new):
            if dt0 is not None and dt1 is not None and dt0 != dt1:
                return f"{kind} '{name}' changed dtype {dt0} -> {dt1}"
            if sh0 is not None and sh1 is not None and (
                    len(sh0) != len(sh1) or any(a is not None and b is not None and a != b for a, b in zip(sh0, sh1))):
                return f"{kind} '{name}' changed shape {list(sh0)} -> {list(sh1)}"
    return None


def check_equivalent(original: ir.Model, rewritten: ir.Model, what: str,
                     tolerance: float = EQUIVALENCE_TOLERANCE) -> None:
    """Refuse (EffcError naming ``what``) a rewritten model whose interface or outputs on seeded
    inputs differ from the original's."""
    change = interface_change(original, rewritten)
    if change:
        raise EffcError(f"{what} changes the model: {change}")
    feeds = make_inputs(original)
    try:
        reference = OrtRunner(original).run_all(feeds)
    except OrtRunError as exc:
        raise EffcError(f"{what} cannot be checked: ONNX Runtime cannot run the original model on effc's "
                        f"generated inputs ({exc.reason})") from None
    try:
        err = deviation(OrtRunner(rewritten).run_all(feeds), reference)
    except EffcError as exc:
        raise EffcError(f"{what} changes the model: {exc}") from None
    except Exception as exc:
        raise EffcError(f"{what} gives a model ONNX Runtime cannot run ({_first_line(exc)})") from None
    if not err.max_rel <= tolerance:
        raise EffcError(f"{what} changes the model's outputs (max rel err {err.max_rel:.3g} > {tolerance:g})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class OrtRunError(EffcError):
    """ONNX Runtime loaded the model but failed running it on the given inputs."""

    def __init__(self, reason: str):
        super().__init__(f"ONNX Runtime cannot run the model on these inputs ({reason})")
        self.reason = reason


def _ort_reason(exc: BaseException) -> str:
    """ORT's message without its boilerplate: "<op> node '<name>': <status message>"."""
    import re

    text = " ".join(str(exc).split())
    match = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if match:
        op, name, message = match.groups()
        message = re.sub(r"^\S*onnxruntime_src/\S+ ", "", message)  # the C++ source location
        if re.match(r"^(\S+ )?\S*onnxruntime::", message):  # ... and the function signature
            message = re.sub(r"^.*?onnxruntime::.*?\)( const)?( \[with [^\]]*\])? ", "", message, count=1)
        text = f"{op} node '{name}': {message}" if name else f"{op} node: {message}"
    return text[:240]


IN_MEMORY_BYTES = 64 << 20  # larger models reach ONNX Runtime through a temporary file


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class OrtRunner:
    """An ONNX Runtime session over an onnx_ir model (optimisations on, CPU)."""

    def __init__(self, model: ir.Model | str | Path, threads: int = 0, config: dict[str, str] | None = None):
        """``config``: session config entries (e.g. {"session.force_spinning_stop": "1"})."""
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # ORT's own lines (kernel errors are logged at 3) stay off stderr:
        opts = ort.SessionOptions()        # effc reports every failure itself, in one line
        opts.log_severity_level = 4
        if threads:
            opts.intra_op_num_threads = threads
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        self._tmp = None
        if isinstance(model, (str, Path)):
            source: bytes | str = str(model)
        else:
            from effc import memory_guard

            memory_guard.check(model)  # before anything runs: a memory bomb is refused, not run
            if _weight_bytes(model) < IN_MEMORY_BYTES:
                source = in_memory_proto(model).SerializeToString()
            else:
                # A proto, its serialized bytes and ORT's copy would each hold every weight once more
                # (bert-base: 2.9 GiB peak); from a file with external data ORT reads them once.
                from effc.ir import save_streamed

                self._tmp = tempfile.TemporaryDirectory(prefix="effc-ort-")
                source = str(save_streamed(model, Path(self._tmp.name) / "model.onnx"))
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EffcError(f"ONNX Runtime cannot load the model ({str(exc).strip().splitlines()[0][:200]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        try:
            values = self.session.run(self.output_names, feed)
        except Exception as exc:  # ORT's own failure on these inputs: the caller says what to do
            raise OrtRunError(_ort_reason(exc)) from None
        return dict(zip(self.output_names, values))

    def run_all(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [self(f) for f in feeds]
