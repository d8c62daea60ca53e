"""Every compile is measured against the model as the user gave it, before any opset upgrade."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper, version_converter

from effc.errors import EffcError
from effc.frontend import onnx as frontend
from tests.conftest import tiny_mlp_proto
from tests.reliability.common import effc, one_line_refusal, save_proto


def _scan8() -> onnx.ModelProto:
    """Opset-8 Scan (a batch axis first) whose upgrade to Scan-9+ drops that axis from the interface."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body", [helper.make_tensor_value_info("s_in", T.FLOAT, [4]), helper.make_tensor_value_info("x_t", T.FLOAT, [4])],
        [helper.make_tensor_value_info("s_out", T.FLOAT, [4]), helper.make_tensor_value_info("y_t", T.FLOAT, [4])])
    node = helper.make_node("Scan", ["", "init", "x"], ["final", "ys"], num_scan_inputs=1, body=body)
    graph = helper.make_graph(
        [node], "scan8", [helper.make_tensor_value_info("init", T.FLOAT, [2, 4]),
                          helper.make_tensor_value_info("x", T.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("final", T.FLOAT, [2, 4]), helper.make_tensor_value_info("ys", T.FLOAT, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 8
    return model


def test_upgrade_that_changes_the_interface_is_refused(tmp_path):
    src = save_proto(_scan8(), tmp_path / "scan8.onnx")
    line = one_line_refusal(effc("compile", src, "-o", tmp_path / "out"))
    assert "opset 8 -> 13 upgrade changes the model: input 'init' changed shape [2, 4] -> [4]" in line
    assert not (tmp_path / "out").exists()


def test_an_equivalent_upgrade_compiles(tmp_path):
    src = save_proto(tiny_mlp_proto(opset=8), tmp_path / "mlp8.onnx")
    proc = effc("compile", src, "-o", tmp_path / "out", "--passes", "none")
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(tmp_path / "out" / "model.onnx").opset_import[0].version == 13


def test_the_reference_is_the_file_as_given(monkeypatch):
    """An upgrade that silently changed a weight is caught: the comparison runs the un-upgraded model."""
    real = version_converter.convert_version

    def tampering(proto, target):
        converted = real(proto, target)
        w = numpy_helper.to_array(converted.graph.initializer[0])
        converted.graph.initializer[0].CopyFrom(numpy_helper.from_array(w * 1.01, converted.graph.initializer[0].name))
        return converted

    monkeypatch.setattr(frontend.version_converter, "convert_version", tampering)
    with pytest.raises(EffcError, match=r"opset 8 -> 13 upgrade changes the model's outputs \(max rel err"):
        frontend.from_proto(tiny_mlp_proto(opset=8), origin="mlp8.onnx")
    frontend.from_proto(tiny_mlp_proto(opset=13), origin="mlp13.onnx")  # no upgrade, nothing compared


def test_explicit_opset_upgrade_is_checked_too():
    model = frontend.from_proto(tiny_mlp_proto(opset=13), opset=17, origin="mlp13.onnx")
    assert model.opset_imports[""] == 17
    x = np.ones((1, 4, 8), np.float32)
    from effc.verify import OrtRunner

    ref = OrtRunner(frontend.from_proto(tiny_mlp_proto(opset=13)))({"x": x})["y"]
    np.testing.assert_allclose(OrtRunner(model)({"x": x})["y"], ref, rtol=1e-6)
