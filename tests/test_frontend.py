"""Loading: opset upgrades, external data, bad files, torch modules and .pt2 archives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from effc import EffcError, from_torch, load, save
from effc.ir import opset
from effc.verify import OrtRunner, deviation, make_inputs
from tests.helpers import tiny_mlp_proto


def test_old_opset_is_upgraded(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(tiny_mlp_proto(opset=11), path)
    model = load(path)
    assert opset(model) == 13


def test_explicit_opset_conversion(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp_proto(opset=13), path)
    assert opset(load(path, opset=18)) == 18
    with pytest.raises(EffcError, match="outside the supported range"):
        load(path, opset=30)


def test_shapes_are_inferred(tiny_onnx):
    model = load(tiny_onnx)
    hidden = next(n for n in model.graph if n.name == "act").outputs[0]
    assert list(hidden.shape) == [1, 4, 16]


@pytest.mark.parametrize("content, message", [
    (b"\x00garbage\xff" * 10, "not an ONNX model"),
    (b"", "not an ONNX model"),
])
def test_garbage_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(EffcError, match=message):
        load(path)


def test_truncated_file_is_refused(tiny_onnx, tmp_path):
    data = tiny_onnx.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EffcError):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(EffcError, match="no such file"):
        load(tmp_path / "nope.onnx")


def test_external_data_roundtrip(tmp_path, monkeypatch):
    import effc.ir

    monkeypatch.setattr(effc.ir, "EXTERNAL_DATA_THRESHOLD", 64)
    model = load_tiny(tmp_path)
    out = save(model, tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / "model.onnx.data").exists()
    assert out.stat().st_size < 1000  # weights live outside the protobuf
    again = load(out)
    feeds = make_inputs(again)
    assert deviation(OrtRunner(again).run_all(feeds), OrtRunner(model).run_all(feeds)).max_abs == 0.0
    assert not list((tmp_path / "out").glob(".effc-*"))  # no temp leftovers


def load_tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp_proto(), path)
    return load(path)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.ln(x))


def test_from_torch_matches_eager():
    torch.manual_seed(0)
    module = _Block().eval()
    x = torch.randn(1, 4, 8)
    model = from_torch(module, (x,), input_names=["x"], output_names=["y"])
    assert model.ir_version <= 10 and opset(model) == 23
    got = OrtRunner(model)({"x": x.numpy()})["y"]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_pt2_archive_loads(tmp_path):
    torch.manual_seed(0)
    module = _Block().eval()
    x = torch.randn(1, 4, 8)
    path = tmp_path / "block.pt2"
    torch.export.save(torch.export.export(module, (x,)), path)
    model = load(path)
    got = list(OrtRunner(model)({model.graph.inputs[0].name: x.numpy()}).values())[0]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_bad_pt2_is_refused(tmp_path):
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(EffcError, match="not a torch.export archive"):
        load(path)
