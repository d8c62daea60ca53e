"""`effc compile --target llvm` checks every built module against ONNX Runtime: a wrong kernel (injected
here: a matmul rule whose accumulator starts at 1 instead of 0) makes compile exit 1 naming that
kernel and its rule, and leaves no module behind; a right build says how close it came."""

from __future__ import annotations

import onnx
import pytest

from effc.codegen.check import find_wrong_kernels
from tests.codegen.blocks import transformer_block_proto

pytest.importorskip("tvm")


class OffByOneMatmul:
    """The real matmul rule, then the accumulator's 0.0 init rewritten to 1.0 (a legal, wrong kernel)."""

    name = "broken-matmul"

    def __init__(self):
        from effc.codegen.schedules.cpu.matmul import Matmul

        self.inner = Matmul()

    def apply(self, func, target, tunable):
        import tvm
        from tvm import s_tir

        sch = self.inner.apply(func, target, tunable)
        if sch is None:
            return None
        text = sch.mod["main"].script()
        if "T.float32(0.0)" not in text:
            return None
        return s_tir.Schedule(tvm.script.from_source(text.replace("T.float32(0.0)", "T.float32(1.0)", 1)))


def _run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from effc.cli import run

    code = run(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def block_path(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(transformer_block_proto(), path)
    return path


def test_a_right_build_is_verified(tmp_path, block_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, err = _run_cli(monkeypatch, capsys, "compile", str(block_path), "-o", str(out), "--target", "llvm",
                         "--passes", "none")
    assert code == 0, err
    assert "verified against ONNX Runtime on 2 input(s): max rel err" in err
    assert (out / "model.so").exists() and (out / "codegen.json").exists()


def test_a_wrong_kernel_fails_compile_and_is_named(tmp_path, block_path, monkeypatch, capsys):
    import effc.codegen.schedules.cpu as cpu_rules

    real = cpu_rules.default_rules
    monkeypatch.setattr(cpu_rules, "default_rules", lambda records=None: [OffByOneMatmul(), *real(records)])
    out = tmp_path / "out"
    code, err = _run_cli(monkeypatch, capsys, "compile", str(block_path), "-o", str(out), "--target", "llvm",
                         "--passes", "none")
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("effc: error: the compiled module disagrees with ONNX Runtime"), err
    assert "first wrong kernel: " in last and "(rule broken-matmul" in last, last
    assert not out.exists(), "a failed check must leave no OUT (there was none before)"
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "staging directory left behind"


def test_localiser_names_only_the_broken_kernels():
    """Against their unscheduled forms, the effc rules' kernels all agree; the injected one does not."""
    from effc.codegen.build import front_half
    from effc.codegen.schedules.cpu import default_rules
    from effc.codegen.target import make_target
    from effc.frontend.onnx import from_proto

    bt = make_target("llvm")
    model = from_proto(transformer_block_proto())

    def fused():
        return front_half(model, bt)[1]

    assert find_wrong_kernels(fused(), default_rules(), bt.tvm()) == []
    faults = find_wrong_kernels(fused(), [OffByOneMatmul(), *default_rules()], bt.tvm())
    assert faults and all(f.rule == "broken-matmul" and "matmul" in f.kernel for f in faults), faults
    assert all(f.max_rel > 1e-3 for f in faults)


@pytest.mark.parametrize("command", ["run", "bench"])
def test_run_and_bench_exit_1_when_the_module_disagrees(tmp_path, block_path, monkeypatch, capsys, command):
    """A module whose model.onnx was swapped for other weights: outputs are written, exit status 1."""
    import numpy as np

    out = tmp_path / "out"
    assert _run_cli(monkeypatch, capsys, "compile", str(block_path), "-o", str(out), "--target", "llvm",
                    "--passes", "none")[0] == 0
    onnx.save(transformer_block_proto(seed=1), out / "model.onnx")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32))
    args = (["run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")] if command == "run"
            else ["bench", str(out), "--runs", "1", "--warmup", "0"])
    code, err = _run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "disagrees with ONNX Runtime on its own model.onnx" in err.strip().splitlines()[-1], err
    if command == "run":
        assert (tmp_path / "y.npz").exists()
