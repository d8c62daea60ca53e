"""Typed pass options, --set and its aliases, `passes -v`, OUT/recipe.json, compile --recipe, tune OUT."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from effc import cli
from effc.frontend.onnx import load
from effc.passes import REGISTRY, Pass, PassOutcome
from effc.passes.options import as_dict, option, specs
from tests.passes import shift_add_models
from tests.passes.shift_add_models import feeds


def effc(capsys, *args) -> tuple[int, str, str]:
    code = cli.run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *args) -> str:
    code, _, err = effc(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def mlp() -> onnx.ModelProto:
    """x[1,16,32] -> [MatMul -> Add -> Relu] x 3 -> y: shift-add keeps the first and last linears dense."""
    return shift_add_models.mlp(dims=(32, 64, 64, 16))


@pytest.fixture
def model(tmp_path):
    """x[1,16,32] -> fc0 -> fc1 (64x64, the one shift-add takes) -> fc2; and its calibration .npz."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    calib = tmp_path / "cal.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds(8)]))
    return path, calib


def planes_of(out) -> list[int]:
    """Bit planes of each effc.ShiftAddMatMul in OUT/model.onnx (its planes input is [q, N, K/8])."""
    graph = load(out / "model.onnx").graph
    return [int(n.inputs[1].const_value.shape[0]) for n in graph if n.op_type == "ShiftAddMatMul"]


# --- two passes, one option name ------------------------------------------------------------

@dataclass
class _ToyOptions:
    bits: int = option(8, "a toy option named like shift-add's", low=1, high=16)


class _Toy(Pass):
    """Leaves the model alone and remembers the options it was handed."""

    name, summary, exact = "toy-bits", "records its options", True
    Options = _ToyOptions
    seen: list = []

    def run(self, model, ctx):
        type(self).seen.append(ctx.options)
        return PassOutcome()


def test_same_option_name_in_two_passes_set_apart(model, tmp_path, capsys, monkeypatch):
    path, calib = model
    monkeypatch.setitem(REGISTRY, _Toy.name, _Toy)
    monkeypatch.setattr(_Toy, "seen", [])
    out = tmp_path / "out"
    code, _, err = effc(capsys, "compile", path, "-o", out, "--passes", "toy-bits,shift-add", "--calib", calib,
                        "--set", "shift-add.bits=2", "--set", "toy-bits.bits=5")
    assert code == 0, err
    assert _Toy.seen == [_ToyOptions(bits=5)]  # its own options object, nothing of shift-add's
    assert planes_of(out) == [2]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["options"]["toy-bits"] == {"bits": 5} and recipe["options"]["shift-add"]["bits"] == 2


def _another_value(spec):
    """A valid value of an option other than its default."""
    if spec.type is bool:
        return not spec.default
    if spec.choices is not None:
        return next(c for c in spec.choices if c != spec.default)
    if spec.type is str:
        return "fc1"
    if spec.default is None:
        low = spec.low if spec.low is not None else 0
        return spec.type((low + spec.high) / 2 if spec.high is not None else low + 1)
    step = 1 if spec.type is int else 0.5
    value = spec.default + step
    return value if spec.high is None or value <= spec.high else spec.default - step


def test_every_option_of_every_pass_is_settable(model, tmp_path, capsys, monkeypatch):
    """Every declared option of every registered pass, set with --set to a value other than its
    default, reaches that pass (and only it) and OUT/recipe.json."""
    path, calib = model
    handed = {}
    for cls in REGISTRY.values():
        def spy(self, model, ctx, run=cls.run):
            handed[self.name] = ctx.options
            return run(self, model, ctx)
        monkeypatch.setattr(cls, "run", spy)
    wanted = {name: {o.name: _another_value(o) for o in specs(p.Options)} for name, p in REGISTRY.items()}
    sets = [a for name, values in wanted.items() for k, v in values.items()
            for a in ("--set", f"{name}.{k}={str(v).lower()}")]
    assert sum(map(len, wanted.values())) >= 14  # shift-add's 13 and layernorm-to-rmsnorm's untie
    out = tmp_path / "out"
    code, _, err = effc(capsys, "compile", path, "-o", out, "--passes", ",".join(REGISTRY), "--calib", calib, *sets)
    assert code == 0, err
    recipe = json.loads((out / "recipe.json").read_text())
    for name, p in REGISTRY.items():
        assert type(handed[name]) is p.Options and as_dict(handed[name]) == wanted[name]
        assert recipe["options"][name] == wanted[name]


@pytest.mark.parametrize("flag, value, pass_name, name, typed", [
    ("--bits", "2", "shift-add", "bits", 2),
    ("--group", "16", "shift-add", "group", 16),
    ("--layers", "fc1", "shift-add", "layers", "fc1"),
    ("--avg-bits", "2.5", "shift-add", "avg_bits", 2.5),
    ("--no-untie", None, "layernorm-to-rmsnorm", "untie", False),
])
def test_old_flags_are_aliases(model, tmp_path, capsys, flag, value, pass_name, name, typed):
    path, calib = model
    out = tmp_path / "out"
    code, _, err = effc(capsys, "compile", path, "-o", out, "--passes", f"layernorm-to-rmsnorm,shift-add",
                        "--calib", calib, flag, *([value] if value else []))
    assert code == 0, err
    assert json.loads((out / "recipe.json").read_text())["options"][pass_name][name] == typed


def test_alias_errors_name_the_flag(tiny_onnx, tmp_path, capsys):
    line = one_line_error(capsys, "compile", tiny_onnx, "-o", tmp_path / "out", "--passes", "shift-add",
                          "--bits", "5")
    assert line.startswith("effc: error: --bits 5 (= --set shift-add.bits)") and "one of 2, 3, 4" in line
    line = one_line_error(capsys, "compile", tiny_onnx, "-o", tmp_path / "out", "--passes", "shift-add",
                          "--avg-bits", "1.5")
    assert "--avg-bits 1.5" in line and "in [2, 4]" in line


def test_alias_and_set_must_agree(model, tmp_path, capsys):
    path, calib = model
    line = one_line_error(capsys, "compile", path, "-o", tmp_path / "out", "--passes", "shift-add", "--calib",
                          calib, "--bits", "2", "--set", "shift-add.bits=3")
    assert "--bits" in line and "disagree" in line


@pytest.mark.parametrize("setting, words", [
    ("nope.bits=2", ["unknown pass 'nope'", "shift-add", "fold-batchnorm"]),
    ("shift-add.bitz=2", ["no option 'bitz'", "bits", "refine"]),
    ("shift-add.bits=5", ["shift-add.bits=5", "one of 2, 3, 4"]),
    ("shift-add.bits=two", ["not a int", "one of 2, 3, 4"]),
    ("shift-add.group=0", ["out of range", "1 or more"]),
    ("shift-add.avg_bits=4.5", ["out of range", "in [2, 4]"]),
    ("shift-add.clip=maybe", ["not a bool", "true or false"]),
    ("layernorm-to-rmsnorm.untie=2", ["not a bool"]),
    ("fold-batchnorm.bits=2", ["no option 'bits'", "none"]),
    ("shift-add-bits", ["expected PASS.OPTION=VALUE"]),
])
def test_bad_settings_exit_2_naming_what_is_accepted(tiny_onnx, tmp_path, capsys, setting, words):
    line = one_line_error(capsys, "compile", tiny_onnx, "-o", tmp_path / "out", "--passes", "shift-add",
                          "--set", setting)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists()


def test_options_for_a_pass_not_run_exit_2(tiny_onnx, tmp_path, capsys):
    line = one_line_error(capsys, "compile", tiny_onnx, "-o", tmp_path / "out", "--bits", "2")
    assert "'shift-add', which is not run" in line


def test_calibration_needed_unless_compensation_is_off(model, tmp_path, capsys):
    path, _ = model
    line = one_line_error(capsys, "compile", path, "-o", tmp_path / "out", "--passes", "shift-add")
    assert "shift-add.compensate=true needs calibration data" in line and "--calib" in line
    code, _, err = effc(capsys, "compile", path, "-o", tmp_path / "out", "--passes", "shift-add",
                        "--set", "shift-add.compensate=false")
    assert code == 0 and planes_of(tmp_path / "out") == [3], err


def test_passes_verbose_lists_every_option(capsys):
    code, out, _ = effc(capsys, "passes", "-v")
    assert code == 0
    lines = out.splitlines()
    for name, p in REGISTRY.items():
        for o in specs(p.Options):
            row = next(line for line in lines if line.split()[0] == f"{name}.{o.name}")
            assert o.type_name.split()[0] in row and o.accepts in row and o.help in row
    bits = next(line for line in lines if line.split()[0] == "shift-add.bits")
    assert "default 3" in bits and "one of 2, 3, 4" in bits
    code, short, _ = effc(capsys, "passes")
    assert "shift-add.bits" not in short


# --- recipe ----------------------------------------------------------------------------------

def test_recipe_reproduces_a_compile_and_flags_override_it(model, tmp_path, capsys, monkeypatch):
    path, calib = model
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    code, _, err = effc(capsys, "compile", path, "-o", first, "--passes", "shift-add", "--bits", "2",
                        "--set", "shift-add.refine=1", "--calib", calib)
    assert code == 0, err
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["calib"] == str(calib.resolve()) and recipe["calib_hash"].startswith("sha256:")
    assert recipe["passes"] == ["shift-add"] and recipe["target"] is None and recipe["model"] == str(path)
    code, _, err = effc(capsys, "compile", path, "-o", again, "--recipe", first / "recipe.json")
    assert code == 0, err
    assert (again / "model.onnx").read_bytes() == (first / "model.onnx").read_bytes() and "made on" not in err
    assert json.loads((again / "recipe.json").read_text()) == recipe
    monkeypatch.chdir(calib.parent)
    code, _, err = effc(capsys, "compile", path, "-o", other, "--recipe", first, "--bits", "3", "--calib", calib.name)
    assert code == 0, err
    assert "overrides shift-add.bits=3 (recipe: 2)" in err and planes_of(other) == [3]
    assert "--calib" not in err  # the same file (a relative path to it), given again, is no override
    assert json.loads((other / "recipe.json").read_text())["options"]["shift-add"]["refine"] == 1


def test_recipe_refuses_changed_calibration(model, tmp_path, capsys):
    path, calib = model
    assert effc(capsys, "compile", path, "-o", tmp_path / "first", "--passes", "shift-add", "--calib", calib)[0] == 0
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds(8, seed=1)]))
    line = one_line_error(capsys, "compile", path, "-o", tmp_path / "again", "--recipe", tmp_path / "first")
    assert "not the data the recipe was made with" in line


def test_recipe_errors(tiny_onnx, tmp_path, capsys):
    line = one_line_error(capsys, "compile", tiny_onnx, "-o", tmp_path / "out", "--recipe", tmp_path / "none.json")
    assert "no such recipe" in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": ["shift-add"]}))
    assert "not an effc recipe" in one_line_error(capsys, "compile", tiny_onnx, "-o", tmp_path / "out",
                                                  "--recipe", bad)


def test_tune_out_tunes_exactly_the_kernels_compile_built(model, tmp_path, capsys):
    path, calib = model
    out = tmp_path / "out"
    code, _, err = effc(capsys, "compile", path, "-o", out, "--passes", "shift-add", "--bits", "2",
                        "--calib", calib, "--target", "llvm", "--no-verify")
    assert code == 0, err
    manifest = json.loads((out / "codegen.json").read_text())
    built = sorted(k for k, rule in manifest["kernels"].items() if rule == "matmul")
    assert len(built) >= 2  # fc0 and fc2 (fc1, where AVX-512 has the LUT kernel, is hand-written: not tuned)
    code, text, err = effc(capsys, "tune", out, "--trials", "1", "--records", tmp_path / "rec.json")
    assert code == 0, err
    assert "passes shift-add (shift-add: bits=2), calibration" in text
    assert f"tuned all {len(built)} matmul kernels" in text
    records = json.loads((tmp_path / "rec.json").read_text())["records"]
    assert sorted(r["kernel"] for r in records.values()) == built  # two distinct shapes: one workload each
    # the same compile again (its recipe) with those records: the build applies them to every matmul kernel
    code, _, err = effc(capsys, "compile", path, "-o", tmp_path / "tuned", "--recipe", out, "--records",
                        tmp_path / "rec.json", "--no-verify")
    assert code == 0 and "overrides --records" in err, err
    assert json.loads((tmp_path / "tuned" / "codegen.json").read_text())["tuned_kernels"] == len(built)
    # the model compiled, through the recipe: the same passes, options and calibration give the same kernels
    code, text, err = effc(capsys, "tune", path, "--trials", "1", "--records", tmp_path / "again.json",
                           "--recipe", out / "recipe.json")
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())["records"]
    assert sorted(r["kernel"] for r in again.values()) == built and again.keys() == records.keys()
    line = one_line_error(capsys, "tune", out, "--records", tmp_path / "rec.json", "--recipe", out)
    assert "already through its passes" in line
