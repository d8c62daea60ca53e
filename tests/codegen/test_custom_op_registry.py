"""A new effc op lowered to its own kernel with one registration, from this file alone.

The toy op effc.ScaledAdd (Y = A + B * scale, scale a constant [N]) is registered here with its ONNX
function body and a hand-written TIR kernel whose fit test takes N a multiple of 4 only. `effc
compile --target llvm` (in-process, so that the registration holds) must call the kernel where it
fits and say so in codegen.json, run the function body where it does not, with the refusal's reason
in the manifest, and agree with ONNX Runtime running the function body.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.ops import DOMAIN, DOMAIN_VERSION, registry
from effc.verify import OrtRunner, deviation

pytest.importorskip("tvm")

NAME = "ScaledAdd"
RULE = "toy-scaled-add"
LANES = 4  # the toy kernel's (pretended) vector width: N must be a multiple of it
_BODY = """
<domain: "effc", opset_import: ["" : 17]>
ScaledAdd (A, B, scale) => (Y)
{
    scaled = Mul (B, scale)
    Y = Add (A, scaled)
}
"""


def function(opset: int) -> ir.Function:
    return ir.serde.deserialize_function(onnx.parser.parse_function(_BODY))


def kernel_func(shape: tuple[int, ...], sign: float):
    """Hand-written TIR for A, B [b, s, n] and the packed scale [1, n]: Y = A + sign * B * scale."""
    from tvm.script import tirx as T

    b, s, n = shape

    @T.prim_func(s_tir=True)
    def scaled_add(a: T.Buffer((b, s, n), "float32"), x: T.Buffer((b, s, n), "float32"),
                   scale: T.Buffer((1, n), "float32"), y: T.Buffer((b, s, n), "float32")):
        T.func_attr({"global_symbol": "scaled_add", "tirx.noalias": True})
        for i, j in T.grid(b, s):
            for k in T.serial(n):
                y[i, j, k] = a[i, j, k] + x[i, j, k] * (scale[0, k] * T.float32(sign))

    return scaled_add


def fit(node, constants, target) -> str | None:
    (scale,) = constants
    if scale.ndim != 1 or scale.shape[0] % LANES:
        return f"N={scale.shape[0]} is not a multiple of {LANES}"
    return None


def make_op(sign: float = 1.0) -> registry.CustomOp:
    def build(shapes, constants) -> registry.Kernel:
        (a_shape, _), (scale,) = shapes, constants
        packed = np.ascontiguousarray(scale, np.float32).reshape(1, -1)  # the kernel's layout
        symbol = "toy_scaled_add_" + "x".join(map(str, a_shape)) + "_"  # TVM may append digits
        return registry.Kernel("toy_scaled_add", symbol, kernel_func(a_shape, sign), (packed,))

    return registry.CustomOp(DOMAIN, NAME, function, packed=(2,), rule=RULE,
                             targets={"llvm": registry.TargetKernels(fit=fit, build=build)})


@pytest.fixture
def registered():
    def register(op):
        registry.register(op)
        return op

    yield register
    registry.unregister(DOMAIN, NAME)


def toy_model(path) -> None:
    """Two ScaledAdd nodes, batch 2: 'fits' with N=8 (the kernel), 'misfit' with N=6 (refused)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node(NAME, ["a", "b", "scale8"], ["y8"], name="fits", domain=DOMAIN),
             helper.make_node(NAME, ["c", "d", "scale6"], ["y6"], name="misfit", domain=DOMAIN)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, w]) for n, w in
              (("a", 8), ("b", 8), ("c", 6), ("d", 6))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, w]) for n, w in (("y8", 8), ("y6", 6))]
    inits = [numpy_helper.from_array(rng.standard_normal(w).astype(np.float32), f"scale{w}") for w in (8, 6)]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=[onnx.parser.parse_function(_BODY)])
    model.ir_version = 10
    onnx.save(model, path)


def compile_cli(tmp_path, monkeypatch, capsys):
    """`effc compile toy.onnx --target llvm` through the CLI's entry point: (exit code, output, OUT)."""
    from effc.cli import main

    toy_model(tmp_path / "toy.onnx")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["effc", "compile", str(tmp_path / "toy.onnx"), "-o", str(out),
                                      "--passes", "none", "--target", "llvm"])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err, out


def test_registered_op_compiles_to_its_kernel_and_matches_ort(tmp_path, monkeypatch, capsys, registered):
    from effc.codegen.build import load_compiled
    from effc.frontend.onnx import load

    registered(make_op())
    code, output, out = compile_cli(tmp_path, monkeypatch, capsys)
    assert code == 0, output
    assert "ScaledAdd: 1 of 2 on the toy-scaled-add kernels" in output
    manifest = json.loads((out / "codegen.json").read_text())
    lowered = {c["node"]: c for c in manifest["custom_ops"]}
    assert lowered["fits"]["lowering"] == RULE and lowered["fits"]["kernel"] == "toy_scaled_add_2x3x8_"
    assert lowered["misfit"] == {"node": "misfit", "lowering": "function", "reason": "N=6 is not a multiple of 4",
                                 "kernel": None}
    built = [k for k, rule in manifest["kernels"].items() if rule == RULE]
    assert len(built) == 1 and built[0].startswith("toy_scaled_add_2x3x8_"), manifest["kernels"]

    rng = np.random.default_rng(1)
    feeds = [{n: rng.standard_normal((2, 3, w)).astype(np.float32) for n, w in
              (("a", 8), ("b", 8), ("c", 6), ("d", 6))} for _ in range(2)]
    compiled = load_compiled(out)
    expected = OrtRunner(load(str(tmp_path / "toy.onnx"))).run_all(feeds)  # ORT runs the function body
    assert deviation([compiled(f) for f in feeds], expected).max_rel < 1e-6


def test_a_wrong_kernel_is_caught_by_the_build_check(tmp_path, monkeypatch, capsys, registered):
    """The kernel really is what runs: one computing A - B * scale fails `effc compile`'s check
    against ONNX Runtime (exit 1), and no module is left behind."""
    registered(make_op(sign=-1.0))
    code, output, out = compile_cli(tmp_path, monkeypatch, capsys)
    assert code == 1 and "disagrees with ONNX Runtime" in output, output
    assert not (out / "model.so").exists()


def test_unregistered_op_is_refused_by_name(tmp_path, monkeypatch, capsys):
    code, output, _ = compile_cli(tmp_path, monkeypatch, capsys)
    assert code == 2 and "cannot handle: effc.ScaledAdd" in output, output


def test_second_registration_of_a_name_is_refused(registered):
    registered(make_op())
    with pytest.raises(ValueError, match="registered already"):
        registry.register(make_op())
