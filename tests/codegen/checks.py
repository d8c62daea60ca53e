"""Checks shared by the codegen tests: compile for llvm and compare with ONNX Runtime."""

from __future__ import annotations

from effc.verify import OrtRunner, deviation, make_inputs

TOL = 1e-4  # scale-relative, as verify.deviation measures it


def compile_and_compare(model, tmp_path, tol: float = TOL):
    """Compile ``model`` for llvm into ``tmp_path``; assert it agrees with ONNX Runtime on two seeded inputs."""
    from effc.codegen.build import compile_model, run_compiled

    result = compile_model(model, "llvm", tmp_path)
    feeds = make_inputs(model, 2, seed=4)
    dev = deviation(run_compiled(tmp_path, feeds), OrtRunner(model).run_all(feeds))
    assert dev.max_rel < tol, dev
    return result
