"""Small helpers over onnx_ir: constants, consumers, copies and atomic saving."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

# ONNX Runtime 1.31 refuses models whose ir_version is newer than 10.
MAX_IR_VERSION = 10
# Tensors larger than this go to an external data file next to model.onnx.
EXTERNAL_DATA_THRESHOLD = 1024 * 1024


def const_value(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array behind a value if it is a constant (initializer or Constant node)."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "":
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.value.numpy()
        for name in ("value_float", "value_int"):
            if name in node.attributes:
                return np.array(node.attributes[name].value)
        for name in ("value_floats", "value_ints"):
            if name in node.attributes:
                return np.array(list(node.attributes[name].value))
    return None


def opset(model: ir.Model) -> int:
    """The default-domain opset the model imports."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def new_initializer(graph: ir.Graph, array: np.ndarray, name_hint: str) -> ir.Value:
    """Register ``array`` as a fresh initializer with a name unique in ``graph``."""
    name, i = name_hint, 0
    while name in graph.initializers:
        i += 1
        name = f"{name_hint}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def replace_input(node: ir.Node, index: int, array: np.ndarray, name_hint: str) -> ir.Value:
    """Point input ``index`` of ``node`` at a new initializer holding ``array``.

    A new initializer is always created so that other readers of the old constant (tied
    weights) are never changed behind their back; the old one is dropped by dead-code removal.
    """
    value = new_initializer(node.graph, np.ascontiguousarray(array), name_hint)
    node.replace_input_with(index, value)
    return value


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes reading ``value`` (a node reading it twice appears once)."""
    seen: dict[int, ir.Node] = {}
    for node, _ in value.uses():
        seen.setdefault(id(node), node)
    return list(seen.values())


def is_graph_output(value: ir.Value) -> bool:
    return value.is_graph_output()


def op_counts(model: ir.Model) -> dict[str, int]:
    """Op-type histogram of the main graph (custom domains prefixed with the domain)."""
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy (through protobuf) used for rollback and for measuring."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def to_proto(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def in_memory_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto holding every weight, those still in a ``.data`` file read in (``model``'s
    tensors become in-memory ones): what ONNX Runtime is given as bytes, which have no directory to
    find a ``.data`` file in (a compiled model.onnx keeps weights over 1 MiB beside it)."""
    ir.external_data.load_to_model(model)
    return to_proto(model)


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically; large weights go to ``<name>.data`` beside it.

    Everything is written into a temporary directory next to the destination and then moved
    into place, so a crash never leaves a half-written model where a good one was expected.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = to_proto(model)
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=".effc-", dir=path.parent))
    try:
        large = proto.ByteSize() > 1_900_000_000 or any(
            t.ByteSize() > EXTERNAL_DATA_THRESHOLD for t in proto.graph.initializer)
        if large:
            onnx.save_model(proto, tmp / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=EXTERNAL_DATA_THRESHOLD)
        else:
            onnx.save_model(proto, tmp / path.name)
        mode = 0o666 & ~_umask()
        for written in tmp.iterdir():  # temp files are private; the results should not be
            os.chmod(written, mode)
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            (path.parent / data_name).unlink()
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_streamed(model: ir.Model, path: Path) -> Path:
    """Write ``model`` to a new ``path`` with every weight in ``<name>.data``, tensor by tensor (no
    proto holding a second copy of the weights, as :func:`save` builds): for handing a large model to
    ONNX Runtime. Not atomic; for temporary files."""
    original = model.ir_version
    model.ir_version = min(original, MAX_IR_VERSION)
    try:
        ir.save(model, path, external_data=path.name + ".data")
    finally:
        model.ir_version = original
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary sibling and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".effc-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
