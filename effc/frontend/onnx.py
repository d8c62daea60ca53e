"""Load .onnx (with external data) and .pt2 files into onnx_ir, normalised for the passes."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import version_converter

from effc.errors import EffcError

MIN_OPSET = 13
MAX_OPSET = 24  # 24: the Attention op with nonpad_kv_seqlen


def load(path: str | os.PathLike, opset: int | None = None) -> ir.Model:
    """Read a model file into onnx_ir.

    ``.onnx`` files are checked, upgraded to at least opset 13 (or to ``opset`` when given) and
    shape-inferred; ``.pt2`` files (``torch.export.save``) go through torch's ONNX exporter.
    Bad input raises :class:`EffcError` with a one-line reason.
    """
    path = Path(path)
    if not path.exists():
        raise EffcError(f"{path}: no such file")
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.exists():
            raise EffcError(f"{path}: is a directory without model.onnx")
        path = candidate
    if path.suffix == ".pt2":
        from effc.frontend.torch import load_pt2

        return load_pt2(path, opset=opset)
    return from_proto(_read_proto(path), opset=opset, origin=str(path))


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files a model path reads: the model and, for .onnx, its external-data files (best effort:
    an unreadable file yields just itself and `load` reports why)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    files = [path]
    if path.suffix == ".onnx" and path.is_file():
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:
            return files
        for tensor in _tensors(proto.graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.append(path.parent / entry.value)
    return list(dict.fromkeys(files))


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else []:
                yield from _tensors(sub)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _read_proto(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises a zoo of types on garbage
        raise EffcError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node and not proto.graph.output:
        raise EffcError(f"{path}: not an ONNX model (no graph)")
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise EffcError(f"{path}: cannot read external data ({_first_line(exc)})") from None
    return proto


def from_proto(proto: onnx.ModelProto, opset: int | None = None, origin: str = "model") -> ir.Model:
    """Check, upgrade and shape-infer a ModelProto, returning the onnx_ir model."""
    try:
        onnx.checker.check_model(proto, full_check=False)
    except Exception as exc:
        raise EffcError(f"{origin}: fails the ONNX checker ({_first_line(exc)})") from None
    _check_names(proto.graph, origin)
    current = _default_opset(proto)
    target = opset if opset is not None else max(current, MIN_OPSET)
    if not MIN_OPSET <= target <= MAX_OPSET:
        raise EffcError(f"{origin}: opset {target} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    original = proto
    if target != current:
        try:
            proto = version_converter.convert_version(proto, target)
        except Exception as exc:
            raise EffcError(f"{origin}: cannot convert opset {current} to {target} ({_first_line(exc)})") from None
    model = _deserialize(_inferred(proto), origin)
    if target != current:  # every compile is measured against the model as the user gave it
        from effc.verify import check_equivalent

        check_equivalent(_deserialize(_inferred(original), origin), model,
                         f"{origin}: the opset {current} -> {target} upgrade")
    return model


def _deserialize(proto: onnx.ModelProto, origin: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise EffcError(f"{origin}: cannot read the model's graph ({type(cause).__name__}: "
                        f"{_first_line(cause)})") from None


def _check_names(graph: onnx.GraphProto, origin: str) -> None:
    """ONNX names are UTF-8; protobuf hands back bytes for any that are not, which nothing downstream takes."""
    named = [("graph", graph.name), *(("node", n.name) for n in graph.node),
             *(("value", v) for n in graph.node for v in (*n.input, *n.output)),
             *(("initializer", t.name) for t in graph.initializer),
             *(("value", v.name) for v in (*graph.input, *graph.output, *graph.value_info))]
    for kind, name in named:
        if isinstance(name, bytes):
            raise EffcError(f"{origin}: {kind} name {name!r} is not UTF-8 (ONNX names must be)")
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_names(sub, origin)


_SHAPE_DATA_BYTES = 4096  # initializers up to this size stay in for shape inference (shape tensors, axes)


def _inferred(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with inferred shapes. Its weights sit out of the inference, and only the inferred graph
    structure is copied back: onnx copies the whole model into C++ and back, which for bert-base held
    four copies of its weights at once (2.2 GiB to load 440 MB)."""
    held = {}
    for tensor in proto.graph.initializer:
        if len(tensor.raw_data) > _SHAPE_DATA_BYTES:
            held[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        inferred = proto  # shapes are a convenience for the passes; a model without them still loads
    finally:
        for tensor in proto.graph.initializer:
            if tensor.name in held:
                tensor.raw_data = held.pop(tensor.name)
    if inferred is not proto:
        for field in ("node", "value_info", "input", "output"):  # what inference annotates
            proto.graph.ClearField(field)
            getattr(proto.graph, field).extend(getattr(inferred.graph, field))
    return proto


def _default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
