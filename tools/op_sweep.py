"""Operator sweep: one small model per ONNX operator and opset (13-23), built from onnx.defs schemas,
each compiled with `effc compile` in-process. Counts outcomes by exit code; an exit other than 0 or
2-with-one-line, or an exit 0 whose model disagrees with ONNX Runtime on the original, is a failure.

    PYTHONPATH=. python tools/op_sweep.py [--ops Gather,Div] [--opsets 13,23] [-v]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import defs, helper

OPSETS = range(13, 24)
SHAPES = ([2, 3, 4], [2, 3, 4, 5], [3, 3], [3], [], [1, 3, 4, 4])
# (first input's shape, the other inputs' shape): data plus 1-D starts/axes/pads/..., or scalars
MIXED = (([2, 3, 4], [3]), ([2, 3, 4], []), ([2, 3, 4], [1]), ([1, 3, 4, 4], [4]), ([2, 3, 4], [6]),
         ([1, 3, 4, 4], [8]))
CANDIDATES = tuple((s, s) for s in SHAPES) + MIXED
_ATTR_DEFAULTS = {
    defs.OpSchema.AttrType.INT: 1, defs.OpSchema.AttrType.INTS: [1], defs.OpSchema.AttrType.FLOAT: 1.0,
    defs.OpSchema.AttrType.FLOATS: [1.0], defs.OpSchema.AttrType.STRING: "",
    defs.OpSchema.AttrType.STRINGS: [""],
}
_PREFERRED = ("tensor(float)", "tensor(int64)", "tensor(int32)", "tensor(bool)")


def op_versions(opsets=OPSETS) -> list[tuple[str, int]]:
    """(op, opset) for every default-domain operator at each opset in ``opsets`` where its schema changed
    (the first opset of the range counts as a change)."""
    out = []
    for name in sorted({s.name for s in defs.get_all_schemas_with_history() if s.domain == ""}):
        seen = set()
        for opset in opsets:
            try:
                schema = defs.get_schema(name, opset, "")
            except Exception:
                continue
            if schema.deprecated or schema.since_version in seen:
                continue
            seen.add(schema.since_version)
            out.append((name, opset))
    return out


def _type_for(schema, formal) -> str | None:
    allowed = formal.types
    for c in schema.type_constraints:
        if c.type_param_str == formal.type_str:
            allowed = c.allowed_type_strs
    allowed = list(allowed)
    for t in _PREFERRED:
        if t in allowed:
            return t
    return allowed[0] if allowed else None


def _value_info(name: str, type_str: str, shape: list[int]) -> onnx.ValueInfoProto | None:
    type_proto = _type_proto(type_str, shape)
    return None if type_proto is None else helper.make_value_info(name, type_proto)


def _type_proto(type_str: str, shape: list[int]) -> onnx.TypeProto | None:
    """tensor(float) / seq(tensor(int64)) / optional(seq(tensor(float))) -> TypeProto; maps: None."""
    kind, _, inner = type_str.partition("(")
    inner = inner[:-1]
    if kind == "tensor":
        aliases = {"float": "FLOAT", "double": "DOUBLE", "float16": "FLOAT16", "string": "STRING", "bool": "BOOL"}
        return helper.make_tensor_type_proto(onnx.TensorProto.DataType.Value(aliases.get(inner, inner.upper())),
                                             shape)
    element = _type_proto(inner, shape)
    if element is None:
        return None
    if kind == "seq":
        return helper.make_sequence_type_proto(element)
    if kind == "optional":
        return helper.make_optional_type_proto(element)
    return None


def build(op: str, opset: int) -> onnx.ModelProto | None:
    """A checked model with one ``op`` node (all required inputs as graph inputs), or None."""
    schema = defs.get_schema(op, opset, "")
    attrs = {}
    for attr in schema.attributes.values():
        if attr.required:
            if attr.type not in _ATTR_DEFAULTS:
                return None  # graphs, tensors, sparse tensors: not generated
            attrs[attr.name] = _ATTR_DEFAULTS[attr.type]
    formals = [f for f in schema.inputs if f.option != defs.OpSchema.FormalParameterOption.Optional]
    n_out = sum(1 for f in schema.outputs if f.option != defs.OpSchema.FormalParameterOption.Optional) or 1
    index_like = any(_type_for(schema, f) in ("tensor(int64)", "tensor(int32)") for f in formals[1:])
    for first, rest in (MIXED + CANDIDATES) if index_like else CANDIDATES:  # starts/axes/pads/...: 1-D first
        inputs = []
        for i, f in enumerate(formals):
            shape = first if i == 0 else rest
            type_str = _type_for(schema, f)
            count = 2 if f.option == defs.OpSchema.FormalParameterOption.Variadic else 1
            for k in range(count):
                vi = _value_info(f"in{i}_{k}", type_str, shape) if type_str else None
                if vi is None:
                    return None
                inputs.append(vi)
        outputs = [f"out{i}" for i in range(n_out)]
        node = helper.make_node(op, [v.name for v in inputs], outputs, **attrs)
        graph = helper.make_graph([node], f"{op}_{opset}", inputs, [helper.make_value_info(o, onnx.TypeProto())
                                                                     for o in outputs])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
            types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}
            if any(o not in types or not types[o].WhichOneof("value") for o in outputs):
                continue
            del model.graph.output[:]
            model.graph.output.extend(helper.make_value_info(o, types[o]) for o in outputs)
            onnx.checker.check_model(model, full_check=True)
            return model
        except Exception:
            continue
    return None


@dataclass
class Outcome:
    op: str
    opset: int
    code: int
    message: str  # the last stderr line
    lines: int  # stderr lines when the exit is not 0
    matches: bool | None = None  # exit 0: OUT/model.onnx agrees with ONNX Runtime on the original


def compile_one(proto: onnx.ModelProto, op: str, opset: int, workdir: Path, extra: list[str] = ()) -> Outcome:
    from effc.cli import run

    src, out = workdir / f"{op}_{opset}.onnx", workdir / f"{op}_{opset}_out"
    onnx.save(proto, src)
    with _captured_stderr() as err:
        code = run(["compile", str(src), "-o", str(out), *extra])
    text = err.getvalue().strip().splitlines()
    outcome = Outcome(op, opset, code, text[-1] if text else "", len(text) if code else 0)
    if code == 0:
        outcome.matches = _agrees(src, out / "model.onnx")
    shutil.rmtree(out, ignore_errors=True)
    return outcome


def _agrees(original: Path, compiled: Path) -> bool:
    from effc.frontend.onnx import load
    from effc.verify import OrtRunner, deviation, make_inputs

    feeds = make_inputs(load(original), seed=7)
    want = OrtRunner(original).run_all(feeds)
    got = OrtRunner(compiled).run_all(feeds)
    return deviation(got, want).max_rel <= 1e-4


@contextlib.contextmanager
def _captured_stderr():
    """Python's and native code's stderr (ONNX Runtime's log lines count) into one buffer."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        buffer, python_stderr = io.StringIO(), sys.stderr
        sys.stderr = buffer
        try:
            yield buffer
        finally:
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read().decode(errors="replace"))


def sweep(pairs, verbose: bool = False, extra: list[str] = ()) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="effc-sweep-") as tmp:
        for op, opset in pairs:
            proto = build(op, opset)
            if proto is None:
                outcomes.append(Outcome(op, opset, -1, "not generated", 0))
                continue
            outcome = compile_one(proto, op, opset, Path(tmp), extra)
            outcomes.append(outcome)
            if verbose:
                print(f"{op:28s} {opset:3d} exit {outcome.code} {outcome.message[:150]}", flush=True)
    return outcomes


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    """Exits other than 0 or 2-with-one-line, and exit 0 that disagrees with ONNX Runtime."""
    return [o for o in outcomes if o.code != -1 and not (
        (o.code == 0 and o.matches) or (o.code == 2 and o.lines == 1 and o.message.startswith("effc: error:")))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=None, help="comma-separated operators (default: all)")
    parser.add_argument("--opsets", default="13,23", help="first,last opset")
    parser.add_argument("--upgrade", type=int, default=None, help="compile with --opset N (upgrade every model)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    first, last = (int(x) for x in args.opsets.split(","))
    pairs = op_versions(range(first, last + 1))
    if args.ops:
        wanted = set(args.ops.split(","))
        pairs = [p for p in pairs if p[0] in wanted]
    outcomes = sweep(pairs, args.verbose, ["--opset", str(args.upgrade)] if args.upgrade else [])
    counts = collections.Counter("not generated" if o.code == -1 else f"exit {o.code}" for o in outcomes)
    print(f"{len(outcomes)} (op, opset) pairs: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    reasons = collections.Counter(o.message.split("(")[0][:90] for o in outcomes if o.code == 2)
    for reason, n in reasons.most_common(12):
        print(f"  {n:4d}  {reason}")
    bad = failures(outcomes)
    for o in bad:
        print(f"FAIL {o.op} opset {o.opset}: exit {o.code}, {o.lines} lines, matches={o.matches}: {o.message[:200]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
