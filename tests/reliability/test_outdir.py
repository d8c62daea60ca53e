"""OUT is written as a whole: interrupted, concurrent or out-of-space compiles leave the previous OUT
(or none), and effc never writes over its input files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import tiny_mlp_proto
from tests.reliability.common import (ENV, check_out_consistent, effc, effc_cmd, one_line_refusal, save_proto,
                                      tree_digest)


def _staging(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.effc-staging-*"))


def _start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(effc_cmd("compile", src, "-o", out, "--target", "llvm"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_proto(tiny_mlp_proto(seed=0), d / "a.onnx"), save_proto(tiny_mlp_proto(seed=1), d / "b.onnx")


@pytest.fixture(scope="module")
def previous_out(models, tmp_path_factory):
    """A valid `--target llvm` OUT of model a, copied fresh for each test that needs one."""
    out = tmp_path_factory.mktemp("prev") / "out"
    proc = effc("compile", models[0], "-o", out, "--target", "llvm")
    assert proc.returncode == 0, proc.stderr
    return out


def _copy_out(previous: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(previous, dest)
    return dest


# moment: the staged file whose appearance triggers the signal ("" = the staging dir itself, i.e. loading)
@pytest.mark.parametrize("moment,sig", [("", signal.SIGINT), ("model.onnx", signal.SIGTERM),
                                        ("model.so", signal.SIGINT)])
def test_interrupted_build_keeps_previous_out(models, previous_out, tmp_path, moment, sig):
    out = _copy_out(previous_out, tmp_path / "out")
    before = tree_digest(out)
    proc = _start(models[1], out)
    hit = _wait_for(lambda: any((s / moment).exists() for s in _staging(out)), proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), proc.returncode
    if hit and proc.returncode == 130:
        assert tree_digest(out) == before  # the previous OUT, byte for byte
    assert not _staging(out)
    check_out_consistent(out, tmp_path)


def test_interrupted_first_build_leaves_no_out(models, tmp_path):
    for attempt in range(3):  # a loaded machine may finish the tiny build before the poll sees it staged
        out = tmp_path / f"out{attempt}"
        proc = _start(models[1], out)
        if _wait_for(lambda: any((s / "model.onnx").exists() for s in _staging(out)), proc):
            break
        proc.communicate(timeout=120)
    else:
        pytest.fail("the compile finished three times before its staging directory was seen")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not out.exists() and not _staging(out)


def test_second_writer_is_refused(models, previous_out, tmp_path):
    out = _copy_out(previous_out, tmp_path / "out")
    first = _start(models[1], out)
    assert _wait_for(lambda: bool(_staging(out)), first)
    line = one_line_refusal(effc("compile", models[0], "-o", out))
    assert "another effc compile is writing it" in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    check_out_consistent(out, tmp_path)
    assert not _staging(out)


def _external_data_model(d: Path, name: str = "model.onnx") -> Path:
    """tiny MLP whose weights live in d/model.onnx.data."""
    proto = tiny_mlp_proto()
    onnx.save(proto, d / name, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return d / name


def test_out_holding_the_input_is_refused_byte_for_byte(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    src = _external_data_model(d, "m.onnx")
    before = tree_digest(tmp_path)
    for out in (d, tmp_path):  # the input's folder, and a folder above it
        line = one_line_refusal(effc("compile", src, "-o", out))
        assert "holds the input file" in line
        assert tree_digest(tmp_path) == before


def test_out_holding_another_models_weights_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    _external_data_model(other)
    (other / "model.onnx").rename(other / "other.onnx")  # its weights stay in model.onnx.data
    before = tree_digest(other)
    src = save_proto(tiny_mlp_proto(seed=3), tmp_path / "src.onnx")
    line = one_line_refusal(effc("compile", src, "-o", other))
    assert "holds files effc did not write (other.onnx)" in line
    assert tree_digest(other) == before


def _wide_mlp(width: int) -> onnx.ModelProto:
    """x[1,4,8] -> MatMul [8,width] -> MatMul [width,8]: weights big enough to fill a small disk."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((8, width)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((width, 8)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_previous_out(previous_out, small_disk, tmp_path):
    out = _copy_out(previous_out, small_disk / "out")
    before = tree_digest(out)
    # ~256 KB of weights: model.onnx fits beside the previous OUT, the module's params.bin does not
    src = save_proto(_wide_mlp(4096), tmp_path / "wide.onnx")
    line = one_line_refusal(effc("compile", src, "-o", out, "--target", "llvm"))
    assert "no space left" in line.lower()
    assert tree_digest(out) == before and not _staging(out)
    check_out_consistent(out, tmp_path)


SWALLOWED_INTERRUPT = """
import os, signal, sys
import tvm_ffi
from effc.outdir import StagedOut

ctrl_c_inside_tvm = tvm_ffi.convert(lambda: os.kill(os.getpid(), signal.SIGINT))
try:
    with StagedOut(sys.argv[1]) as stage:
        (stage.path / "model.onnx").write_text("half")
        try:
            ctrl_c_inside_tvm()
        except Exception as exc:  # what a rule's `except Exception` sees
            print("swallowed", type(exc).__name__)
        stage.commit()
except KeyboardInterrupt:
    print("interrupted")
"""


def test_an_interrupt_a_library_swallowed_still_discards_the_output(tmp_path):
    """TVM turns a KeyboardInterrupt raised inside its calls into a RuntimeError; code that tolerates
    TVM's failures may swallow it. The output must still not appear. In a process of its own: a
    signal sent to the test process itself once crashed tvm_ffi in a full-suite run (a segfault there
    would take the whole suite down)."""
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SWALLOWED_INTERRUPT, str(out)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["swallowed", "RuntimeError", "interrupted"], proc.stdout
    assert not out.exists() and not _staging(out)
