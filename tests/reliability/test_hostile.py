"""Hostile and unusual inputs: every refusal is exit 2 and one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

from effc.errors import EffcError
from effc.frontend.onnx import from_proto
from effc.verify import OrtRunner, make_inputs
from tests.conftest import tiny_mlp_proto
from tests.reliability.common import ENV, effc, one_line_refusal, save_proto


def _model(nodes, inputs, outputs, opset=17, inits=()):
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _expand_bomb(n: int) -> onnx.ModelProto:
    """~160 bytes: x[1] expanded to n x n, then summed."""
    shape = helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", T.INT64, [2], [n, n]))
    return _model([shape, helper.make_node("Expand", ["x", "shape"], ["big"]),
                   helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
                  [helper.make_tensor_value_info("x", T.FLOAT, [1])], [helper.make_tensor_value_info("y", T.FLOAT, [])])


@pytest.mark.parametrize("n,limit", [(40000, None), (2**31, None), (40000, "1G")])
def test_expand_bomb_refused_fast_and_small(tmp_path, n, limit):
    from effc import memory_guard

    if limit is None and n == 40000 and memory_guard.limit() >= 40000 * 40000 * 4:
        pytest.skip("this machine's default limit admits a 6 GB tensor")
    src = save_proto(_expand_bomb(n), tmp_path / "bomb.onnx")
    assert src.stat().st_size < 250
    start = time.perf_counter()
    args = ["compile", src, "-o", tmp_path / "out"] + (["--max-memory", limit] if limit else [])

    peak_file = tmp_path / "peak_kb"
    # The child writes its own VmHWM at exit: it is per address space, so a fresh exec starts at zero
    # (wait4's ru_maxrss carries over the forking pytest's peak once TVM has run in this session).
    probe = ("import atexit, runpy, sys\n"
             "def peak():\n"
             "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
             f"    open({str(peak_file)!r}, 'w').write(hwm)\n"
             "atexit.register(peak)\n"
             "sys.argv = ['effc', *sys.argv[1:]]\n"
             "runpy.run_module('effc.cli', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, env=ENV)
    seconds = time.perf_counter() - start
    peak_kb = int(peak_file.read_text())
    line = one_line_refusal(proc)
    assert "the model needs about" in line and "over the memory limit" in line and "'big'" in line
    assert seconds < 15  # < 5 s on an idle machine; this one is shared
    assert peak_kb < 500 * 1024
    assert not (tmp_path / "out").exists()


def test_memory_guard_estimate_and_sizes():
    from effc import memory_guard

    model = from_proto(_expand_bomb(1000))
    need, node, value = memory_guard.largest_working_set(model)
    assert node.op_type in ("Expand", "ReduceSum") and value.name == "big"
    assert 4_000_000 <= need <= 4_000_000 + 64  # the 1000 x 1000 float tensor and a few small ones
    with pytest.raises(EffcError, match="over the memory limit 1.0 MiB"):
        memory_guard.check(model, 2**20)
    memory_guard.check(model, 2**30)
    assert memory_guard.parse_size("1.5G") == int(1.5 * 2**30) and memory_guard.parse_size("512M") == 2**29
    with pytest.raises(EffcError):
        memory_guard.parse_size("lots")


def test_indices_and_divisors_are_valid_inputs():
    """Gather indices from a graph input within the data's axis; integer divisors nonzero."""
    gather = _model([helper.make_node("Gather", ["data", "idx"], ["g"], axis=1),
                     helper.make_node("Div", ["a", "b"], ["q"])],
                    [helper.make_tensor_value_info("data", T.FLOAT, [2, 5, 3]),
                     helper.make_tensor_value_info("idx", T.INT64, [7]),
                     helper.make_tensor_value_info("a", T.INT32, [4, 4]), helper.make_tensor_value_info("b", T.INT32, [4, 4])],
                    [helper.make_tensor_value_info("g", T.FLOAT, [2, 7, 3]), helper.make_tensor_value_info("q", T.INT32, [4, 4])])
    model = from_proto(gather)
    feeds = make_inputs(model, count=3)
    for feed in feeds:
        assert feed["idx"].min() >= 0 and feed["idx"].max() < 5 and (feed["b"] != 0).all()
    OrtRunner(model).run_all(feeds)


def test_model_ort_cannot_run_on_generated_inputs_is_refused_with_a_hint(tmp_path):
    """TopK's k from a 2-D graph input: no input effc makes is valid, so it says how to give some."""
    topk = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"])],
                  [helper.make_tensor_value_info("x", T.FLOAT, [1, 4]), helper.make_tensor_value_info("k", T.INT64, [1, 1])],
                  [helper.make_tensor_value_info("v", T.FLOAT, ["a", "b"]), helper.make_tensor_value_info("i", T.INT64, ["a", "b"])])
    src = save_proto(topk, tmp_path / "topk.onnx")
    line = one_line_refusal(effc("compile", src, "-o", tmp_path / "out", "--passes", "none"))
    assert "cannot run the model on effc's generated inputs (TopK node" in line and "--inputs FILE.npz" in line
    np.savez(tmp_path / "in.npz", x=np.ones((2, 4), np.float32), k=np.full((2, 1), 2, np.int64))  # 2 samples
    line = one_line_refusal(effc("compile", src, "-o", tmp_path / "out", "--inputs", tmp_path / "in.npz"))
    assert "on the given inputs (TopK node" in line
    assert "[E:onnxruntime" not in line


def test_sequence_input_refused(tmp_path):
    seq = _model([helper.make_node("SequenceLength", ["s"], ["n"])],
                 [helper.make_value_info("s", helper.make_sequence_type_proto(helper.make_tensor_type_proto(T.FLOAT, [2])))],
                 [helper.make_tensor_value_info("n", T.INT64, [])])
    line = one_line_refusal(effc("compile", save_proto(seq, tmp_path / "seq.onnx"), "-o", tmp_path / "out"))
    assert "input 's' is a sequence, not a tensor" in line


def test_non_utf8_names_refused(tmp_path):
    data = tiny_mlp_proto().SerializeToString()
    for old, kind in ((b"fc1_bias", "node"), (b"W1", "value")):
        src = tmp_path / f"{kind}.onnx"
        src.write_bytes(data.replace(old, old[:-1] + b"\xff"))
        line = one_line_refusal(effc("compile", src, "-o", tmp_path / "out"))
        assert f"{kind} name b'" in line and "is not UTF-8" in line


def test_inspect_binary_and_eval_misfit_refused(tmp_path):
    (tmp_path / "report.bin").write_bytes(bytes(range(256)) * 4)
    assert "not a JSON report" in one_line_refusal(effc("inspect", tmp_path / "report.bin"))
    src = save_proto(tiny_mlp_proto(), tmp_path / "tiny.onnx")
    line = one_line_refusal(effc("eval", src, "--zoo", "vit-digits"))
    assert "takes inputs ['x']; zoo model 'vit-digits' gives ['pixel_values']" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    src = save_proto(tiny_mlp_proto(), tmp_path / "tiny.onnx")
    line = one_line_refusal(effc("compile", src, "-o", ro / "out"))
    assert "Permission denied" in line


def test_out_under_a_file_refused(tmp_path):
    src = save_proto(tiny_mlp_proto(), tmp_path / "tiny.onnx")
    line = one_line_refusal(effc("compile", src, "-o", tmp_path / "tiny.onnx" / "out"))
    assert "tiny.onnx is a file, not a directory" in line


@pytest.mark.parametrize("dtype", [T.BFLOAT16, T.FLOAT8E4M3FN, T.INT4])
def test_inputs_numpy_cannot_feed_are_refused(tmp_path, dtype):
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=T.FLOAT)], [helper.make_tensor_value_info("x", dtype, [2, 4])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])], opset=21)
    line = one_line_refusal(effc("compile", save_proto(model, tmp_path / "m.onnx"), "-o", tmp_path / "out"))
    assert "input 'x' is " in line and "cannot run this model to check it" in line
