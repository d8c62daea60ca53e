"""The shared accuracy budget: parsing, layer choice on held-out data, shift-add under it, CLI refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from effc.budget import (Budget, Candidate, Rate, UpperBound, check_resolution, choose_layers, least_holdout,
                         output_cosine, output_rel, split, wilson_upper)
from effc.errors import EffcError
from effc.ir import const_value
from effc.passes import get_pass
from effc.pipeline import run_pipeline
from effc.verify import OrtRunner
from tests.helpers import effc
from tests.passes.shift_add_models import feeds, mlp


@pytest.mark.parametrize("text, measure, bound", [
    ("cosine>=0.99", "cosine", 0.99), (" rel <= 0.01 ", "rel", 0.01), ("rel<=1e-3", "rel", 1e-3)])
def test_parse_reads_the_bound(text, measure, bound):
    budget = Budget.parse(text)
    assert (budget.measure, budget.bound) == (measure, pytest.approx(bound))


def test_parse_reads_a_zoo_metric_as_a_fraction():
    budget = Budget.parse("metric<=1%", "gpt-text")
    assert budget.measure == "metric" and budget.bound == pytest.approx(0.01) and budget.metric is not None


@pytest.mark.parametrize("text, zoo, says", [
    ("cosine<=0.99", None, "bounded with '>='"), ("rel>=0.1", None, "bounded with '<='"),
    ("cos>=0.9", None, "expected"), ("cosine>=1.5", None, "(0, 1]"), ("rel<=5%", None, "only a metric"),
    ("metric<=1%", None, "needs a zoo model"), ("metric<=0.01", "gpt-text", "percentage"),
    ("metric<=1%", "bert-base", "no task metric")])
def test_parse_refuses_with_the_reason(text, zoo, says):
    with pytest.raises(EffcError, match=None) as caught:
        Budget.parse(text, zoo)
    assert says in str(caught.value)


def test_split_holds_back_the_last_quarter():
    data = [{"x": np.full((1,), i)} for i in range(8)]
    fit, held = split(data)
    assert [int(f["x"][0]) for f in fit] == list(range(6)) and [int(h["x"][0]) for h in held] == [6, 7]
    with pytest.raises(EffcError, match="at least 2"):
        split(data[:1])


@pytest.mark.parametrize("fraction, fit, held", [(0.75, 2, 6), (0.5, 4, 4), (0.1, 7, 1)])
def test_split_holds_back_the_fraction_asked_for(fraction, fit, held):
    data = [{"x": np.full((1,), i)} for i in range(8)]
    got_fit, got_held = split(data, fraction)
    assert (len(got_fit), len(got_held)) == (fit, held)
    assert [int(h["x"][0]) for h in got_held] == list(range(fit, 8))  # the last ones, as before


@pytest.mark.parametrize("fraction, says", [(0.97, "none to fit on"), (0.01, "none to measure on")])
def test_split_refuses_a_fraction_that_empties_a_side(fraction, says):
    with pytest.raises(EffcError, match=says):
        split([{"x": np.zeros(1)}] * 8, fraction)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, float("nan"), "abc"])
def test_parse_refuses_a_holdout_outside_0_1(value):
    with pytest.raises(EffcError, match="between 0 and 1"):
        Budget.parse("rel<=0.01", holdout=value)


def test_parse_keeps_the_holdout_default_a_quarter():
    assert Budget.parse("rel<=0.01").holdout == 0.25 and Budget.parse("rel<=0.01", holdout=0.75).holdout == 0.75


def test_wilson_upper_bound_follows_its_formula():
    z2 = 1.2815515655446004 ** 2  # one-sided 90%
    assert wilson_upper(0, 72) == pytest.approx(z2 / (72 + z2))
    assert wilson_upper(0, 216) < 0.01 < wilson_upper(0, 150)  # 163 held-out samples are the least for 1%
    assert wilson_upper(1, 72) > 1 / 72 and wilson_upper(36, 72) == pytest.approx(0.5 + 0.0749, abs=1e-3)
    assert wilson_upper(72, 72) == pytest.approx(1.0) and wilson_upper(0, 0) == 1.0


def test_a_count_metric_is_read_by_its_upper_bound_not_its_point_estimate():
    budget = Budget.parse("metric<=2%", "vit-digits")
    assert budget.counts == "changed top-1 predictions" and "Wilson" in budget.rule()

    def readings(changed: int, samples: int):
        logits = [{"logits": np.eye(10, dtype=np.float32)[i % 10][None]} for i in range(samples)]
        moved = [{"logits": np.roll(x["logits"], 1)} if i < changed else x for i, x in enumerate(logits)]
        return budget.value(moved, logits, [{} for _ in logits])

    one_in_72 = readings(1, 72)  # 1.4% as a point estimate: under 2%, yet not shown to be
    assert isinstance(one_in_72, UpperBound) and one_in_72.rate == Rate(1, 72)
    assert not budget.holds(one_in_72) and "1 of 72 changed (90% upper bound 4.53%) > 2.00%" in \
        budget.shortfall(one_in_72)
    assert not budget.holds(readings(0, 72)) and "too few held-out samples" in budget.shortfall(readings(0, 72))
    assert budget.holds(readings(0, 216)) and budget.holds(readings(1, 216))  # 1 of 216: bound 1.53%
    assert not budget.holds(readings(2, 216))


def test_a_mean_metric_is_read_as_measured():
    budget = Budget.parse("metric<=1%", "gpt-text")
    assert budget.counts is None and "as measured" in budget.rule()
    ids = np.arange(128, dtype=np.int64)[None] % 7
    logits = np.zeros((1, 128, 256), dtype=np.float32)
    value = budget.value([{"logits": logits}], [{"logits": logits}], [{"input_ids": ids}])
    assert type(value) is float and value == 0.0 and budget.holds(value)


def test_measures_follow_their_definitions():
    ref = [{"y": np.array([1.0, 0.0])}, {"y": np.array([0.0, 2.0])}]
    got = [{"y": np.array([1.0, 1.0])}, {"y": np.array([0.0, 2.0])}]
    assert output_cosine(got, ref) == pytest.approx((1 / np.sqrt(2) + 1) / 2)
    assert output_rel(got, ref) == pytest.approx(1 / np.sqrt(5))


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: const_value(v).copy() for name, v in model.graph.initializers.items() if name.startswith("W")}


def _perturb(weight: str, scale: float):
    """A candidate's rewrite: weight W += scale * (a fixed pattern), so its harm grows with ``scale``."""
    def apply(model: ir.Model) -> None:
        value = model.graph.initializers[weight]
        w = const_value(value)
        pattern = np.sign(np.sin(np.arange(w.size))).reshape(w.shape).astype(np.float32)
        value.const_value = ir.tensor(w + np.float32(scale) * pattern * np.abs(w).mean())
    return apply


def test_choose_layers_keeps_the_harmful_ones_in_float_and_meets_the_budget():
    model = ir.serde.deserialize_model(mlp(dims=(32, 32, 32, 32, 32, 32)))
    original = _weights(model)
    scales = {"W0": 0.02, "W1": 0.3, "W2": 0.05, "W3": 3.0, "W4": 0.01}
    candidates = [Candidate(name, _perturb(name, s)) for name, s in scales.items()]
    holdout = feeds(6, seed=3)
    reference = OrtRunner(model).run_all(holdout)
    budget = Budget.parse("rel<=0.12")
    choice = choose_layers(model, candidates, budget, holdout)

    harms = [choice.alone[name] for name in choice.accepted]
    assert harms == sorted(harms) and len(choice.accepted) >= 3  # least harmful first
    assert choice.alone["W3"] == max(choice.alone.values())
    assert "W3" in choice.refused and "alone it gives rel" in choice.refused["W3"]
    assert set(choice.accepted) | set(choice.refused) == set(scales) and not set(choice.accepted) & set(choice.refused)
    measured = output_rel(OrtRunner(model).run_all(holdout), reference)
    assert measured <= 0.12 and measured == pytest.approx(choice.value, rel=1e-5)
    changed = {n for n, w in _weights(model).items() if not np.array_equal(w, original[n])}
    assert changed == set(choice.accepted)  # refused layers are left exactly as they were


def test_choose_layers_refuses_by_a_count_metrics_upper_bound():
    """One changed sample of 8 (12.5%) is under a 20% bound as a point estimate, not as a 90% upper bound."""
    def changed_samples(feeds, outputs, reference):
        moved = sum(not np.allclose(o["y"], r["y"]) for o, r in zip(outputs[:1], reference[:1]))
        return Rate(int(moved), len(reference))  # at most the first sample counts as changed

    budget = Budget("metric", 0.20, "metric<=20%", changed_samples, counts="changed samples")
    model = ir.serde.deserialize_model(mlp(dims=(32, 32, 32)))
    choice = choose_layers(model, [Candidate("W0", _perturb("W0", 0.5))], budget, feeds(8, seed=2))
    assert choice.accepted == [] and choice.alone["W0"].rate == Rate(1, 8)
    assert "alone it gives 1 of 8 changed (90% upper bound" in choice.refused["W0"]
    point = Budget("metric", 0.20, "metric<=20%", lambda f, o, r: changed_samples(f, o, r).changed / len(r))
    assert choose_layers(ir.serde.deserialize_model(mlp(dims=(32, 32, 32))), [Candidate("W0", _perturb("W0", 0.5))],
                         point, feeds(8, seed=2)).accepted == ["W0"]


def test_least_holdout_is_where_no_change_first_reads_within_the_bound():
    for bound in (0.01, 0.02, 0.05):
        need = least_holdout(bound)
        assert wilson_upper(0, need) <= bound < wilson_upper(0, need - 1)
    assert least_holdout(0.01) == 163


@pytest.mark.parametrize("fit, held, says", [
    (216, 72, "needs at least 163 held out: pass --budget-holdout 0.57 or more"),
    (50, 100, "give more calibration samples (--calib), e.g. 218 with --budget-holdout 0.75")])
def test_a_count_budget_too_fine_for_its_holdout_is_refused_up_front(fit, held, says):
    budget = Budget.parse("metric<=1%", "vit-digits")
    with pytest.raises(EffcError, match="even none changed of") as caught:
        check_resolution(budget, fit, held)
    assert says in str(caught.value)
    if "budget-holdout 0.57" in says:  # the advice holds: 0.57 of 288 holds out enough
        check_resolution(budget, *[len(part) for part in split(list(range(288)), 0.57)])
    check_resolution(Budget.parse("metric<=3%", "vit-digits"), 216, 72)  # 72 can show 3%
    check_resolution(Budget.parse("cosine>=0.999"), 15, 1)  # means are read as measured


def test_pipeline_refuses_a_count_budget_before_any_pass_runs(monkeypatch):
    shift_add = get_pass("shift-add")
    monkeypatch.setattr(type(shift_add), "run", lambda *a, **k: pytest.fail("a pass ran"))
    budget = Budget("metric", 0.01, "metric<=1%", lambda f, o, r: Rate(0, len(r)), counts="changed samples")
    with pytest.raises(EffcError, match="counts changed samples: even none changed of 4"):
        run_pipeline(ir.serde.deserialize_model(mlp()), [shift_add], feeds=feeds(2), calibration=feeds(16),
                     budget=budget)


def test_choose_layers_measures_against_the_given_reference():
    model = ir.serde.deserialize_model(mlp(dims=(32, 32, 32, 32)))
    holdout = feeds(4, seed=5)
    reference = OrtRunner(model).run_all(holdout)
    _perturb("W1", 0.5)(model)  # an earlier pass already spent the budget
    choice = choose_layers(model, [Candidate("W0", _perturb("W0", 0.01))], Budget.parse("rel<=0.01"), holdout,
                           reference=reference)
    assert choice.accepted == [] and "W0" in choice.refused


def _shift_add(budget: str | None, calibration):
    model = ir.serde.deserialize_model(mlp(dims=(32, 64, 64, 64, 16)))
    original = OrtRunner(model)
    result = run_pipeline(model, [get_pass("shift-add")], feeds=feeds(2), calibration=calibration,
                          options={"shift-add": {"bits": 2, "layers": "fc*"}},
                          budget=Budget.parse(budget) if budget else None)
    holdout = split(calibration)[1]
    return result.records[0], output_cosine(OrtRunner(result.model).run_all(holdout), original.run_all(holdout))


def test_shift_add_under_a_budget_converts_some_layers_and_stays_within_it():
    calibration = feeds(16, seed=1)
    everything, all_cosine = _shift_add("cosine>=0.01", calibration)
    assert len(everything.rewrites) == 4 and all_cosine < 0.999
    bound = round((1 + all_cosine) / 2, 6)  # half the loss of converting every layer
    record, cosine = _shift_add(f"cosine>={bound}", calibration)
    converted = [r.node for r in record.rewrites]
    refused = {s.node: s.reason for s in record.skipped if s.reason.startswith("kept in float")}
    assert 0 < len(converted) < 4 and len(converted) + len(refused) == 4
    assert cosine >= bound
    assert {layer.node for layer in record.layers} == set(converted)  # records only for converted layers
    assert all("on the holdout (4 samples)" in reason for reason in refused.values())


def test_the_pass_fits_only_on_the_calibration_not_held_out(monkeypatch):
    import effc.passes.shift_add as shift_add

    seen = []
    real = shift_add.gram_matrices

    def spy(model, data, *args, **kwargs):
        seen.append(len(data))
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(shift_add, "gram_matrices", spy)
    _shift_add("cosine>=0.5", feeds(16, seed=1))
    assert seen == [12]


@pytest.mark.parametrize("args, says", [
    (["--budget", "cosine>=2"], "(0, 1]"),
    (["--budget", "cosine>=0.9", "--passes", "shift-add", "--set", "shift-add.compensate=false"], "needs calibration"),
    (["--budget", "cosine>=0.9", "--passes", "fold-batchnorm"], "applies to the lossy passes"),
    (["--budget", "metric<=1%", "--passes", "shift-add", "--calib", "CALIB"], "needs a zoo model"),
    (["--budget-holdout", "0.5", "--passes", "shift-add", "--calib", "CALIB"], "only with --budget"),
    (["--budget", "cosine>=0.9", "--budget-holdout", "1.5", "--passes", "shift-add", "--calib", "CALIB"],
     "between 0 and 1"),
    (["--budget", "cosine>=0.9", "--budget-holdout", "x", "--passes", "shift-add", "--calib", "CALIB"],
     "not a valid float")])
def test_cli_refuses_a_budget_it_cannot_apply_in_one_line(tmp_path, args, says):
    model = tmp_path / "m.onnx"
    import onnx

    onnx.save(mlp(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds(4)]))
    args = [str(calib) if a == "CALIB" else a for a in args]
    proc = effc("compile", model, "-o", tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_compile_records_the_budget_in_the_recipe_and_reasons_in_the_report(tmp_path):
    import json

    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(mlp(dims=(32, 64, 64, 64, 16)), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in feeds(16, seed=1)]))
    proc = effc("compile", model, "-o", tmp_path / "out", "--passes", "shift-add", "--bits", "2",
                "--layers", "fc*", "--calib", calib, "--budget", "cosine>=0.9999", "--budget-holdout", "0.5")
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert (recipe["budget"], recipe["budget_holdout"]) == ("cosine>=0.9999", 0.5)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = [s for s in report["passes"][0]["skipped"] if s["reason"].startswith("kept in float")]
    assert skipped and "kept in float" in proc.stdout + proc.stderr
    assert all("(8 samples)" in s["reason"] for s in skipped)
    assert report["budget"] == {"budget": "cosine>=0.9999", "holdout_fraction": 0.5, "holdout_samples": 8,
                                "fit_samples": 8, "rule": "mean output cosine on the held-out samples, as measured, "
                                "must be >= 0.9999"}
    assert "budget cosine>=0.9999: measured on 8 held-out calibration samples (0.5 of 16; the passes fit on the " \
           "other 8)" in " ".join((proc.stdout + proc.stderr).split())
    shown = effc("inspect", tmp_path / "out")
    assert shown.returncode == 0 and "measured on 8 held-out calibration samples" in " ".join(shown.stdout.split())
    again = effc("compile", model, "-o", tmp_path / "again", "--recipe", tmp_path / "out")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "report.json").read_text())["passes"][0]["skipped"] == \
        report["passes"][0]["skipped"]
