"""Run passes in order, measuring each one against the ORIGINAL model and rolling back failures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import copy_model, op_counts
from effc.passes.base import Pass, PassContext
from effc.passes.cleanup import cleanup
from effc.report import PassRecord
from effc.stats import flops, param_stats
from effc.verify import OrtRunError, OrtRunner, deviation, make_inputs

Feeds = list[dict[str, np.ndarray]]


@dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord]
    feeds: Feeds
    intermediates: list[ir.Model] = field(default_factory=list)
    budget: dict | None = None  # under a budget: effc.budget.summary (holdout size, rule)


def _snapshot(model: ir.Model, shapes: dict[str, list[int]]) -> tuple[dict[str, int], int, int, int]:
    params, nbytes = param_stats(model)
    return op_counts(model), params, nbytes, flops(model, shapes)


def pass_options(passes: list[Pass], options: dict[str, Any] | None, calibration: bool) -> dict[str, Any]:
    """Pass name -> its checked options object; EffcError for options of a pass not in ``passes``,
    a bad value, or a pass that needs what was not given (``calibration``: whether it is)."""
    options = dict(options or {})
    names = {p.name for p in passes}
    stray = sorted(set(options) - names)
    if stray:
        run = ", ".join(sorted(names)) or "none"
        raise EffcError(f"options given for pass '{stray[0]}', which is not run (passes run: {run})")
    chosen = {p.name: p.read_options(options.get(p.name)) for p in passes}
    have = {"calibration"} if calibration else set()
    for p in passes:
        reason = p.missing(chosen[p.name], have)
        if reason:
            raise EffcError(reason)
    return chosen


def check_budget(passes: list[Pass], budget: Any, calibration: bool) -> None:
    """EffcError where ``--budget`` cannot apply: no budgeted pass runs, or no calibration to hold out."""
    if budget is None:
        return
    if not any(p.budgeted for p in passes):
        from effc.passes import REGISTRY

        lossy = ", ".join(sorted(n for n, p in REGISTRY.items() if p.budgeted))
        raise EffcError(f"--budget applies to the lossy passes ({lossy}); none of them is run")
    if not calibration:
        raise EffcError("--budget needs calibration data (--calib): a split of it is held out to measure on")


def run_pipeline(model: ir.Model, passes: list[Pass], feeds: Feeds | None = None,
                 options: dict[str, Any] | None = None, calibration: Feeds | None = None,
                 keep_intermediate: bool = False,
                 progress: Callable[[str], None] | None = None, budget: Any = None) -> PipelineResult:
    """Apply ``passes`` to ``model`` (in place where they succeed) and return a record per pass.

    Every pass's output is run in ONNX Runtime on ``feeds`` (seeded random inputs by default) and
    compared with the original model's outputs. An exact pass that deviates beyond its tolerance,
    or any pass whose output ONNX Runtime cannot run, is rolled back.

    ``options``: pass name -> that pass's options (its ``Options`` object or a dict of values);
    each pass is handed only its own, checked. A pass whose needs are not met (calibration) is
    refused (EffcError) before anything runs.

    ``budget`` (effc.budget.Budget): the last ``budget.holdout`` of ``calibration`` (a quarter by
    default) is held out from fitting and budgeted passes choose their layers by the original
    model's outputs on it.
    """
    chosen = pass_options(passes, options, bool(calibration))
    check_budget(passes, budget, bool(calibration))
    given = bool(feeds)
    feeds = feeds or make_inputs(model)
    shapes = {name: list(arr.shape) for name, arr in feeds[0].items()}
    try:
        reference = OrtRunner(model).run_all(feeds)
    except OrtRunError as exc:
        if given:
            raise EffcError(f"ONNX Runtime cannot run the model on the given inputs ({exc.reason})") from None
        raise EffcError(f"ONNX Runtime cannot run the model on effc's generated inputs ({exc.reason}); give "
                        "inputs it accepts with --inputs FILE.npz (one array per input, first axis = samples)") from None
    holdout = holdout_reference = budget_info = None
    if budget is not None:
        from effc.budget import check_resolution, split, summary

        calibration, holdout = split(calibration, budget.holdout)
        check_resolution(budget, len(calibration), len(holdout))
        budget_info = summary(budget, len(calibration), len(holdout))
        holdout_reference = OrtRunner(model).run_all(holdout)
    records: list[PassRecord] = []
    intermediates: list[ir.Model] = []
    ops, params, nbytes, fl = _snapshot(model, shapes)
    for p in passes:
        if progress:
            progress(p.name)
        start = time.perf_counter()
        backup = copy_model(model)
        record = PassRecord(name=p.name, exact=p.exact, status="skipped", ops_before=ops, ops_after=ops,
                            params_before=params, params_after=params, bytes_before=nbytes, bytes_after=nbytes,
                            flops_before=fl, flops_after=fl, tolerance=p.tolerance if p.exact else None)
        try:
            outcome = p.run(model, PassContext(options=chosen[p.name], calibration=calibration, budget=budget,
                                               holdout=holdout, holdout_reference=holdout_reference))
        except EffcError:
            raise
        except Exception as exc:  # a bug in a pass must not cost the user their model
            model = backup
            record.status, record.note = "rolled-back", f"pass crashed: {type(exc).__name__}: {exc}"
            record.seconds = time.perf_counter() - start
            records.append(record)
            continue
        record.rewrites, record.skipped, record.layers = outcome.rewrites, outcome.skipped, outcome.layers
        if not outcome.changed:
            model = backup  # a pass that did nothing must leave no trace
            if not outcome.skipped:
                record.note = f"nothing to do: no candidate in this model ({p.summary[:1].lower()}{p.summary[1:]})"
        else:
            cleanup(model)
            try:
                err = deviation(OrtRunner(model).run_all(feeds), reference)
            except EffcError as exc:
                err, record.note = None, str(exc)
            if err is None or (p.exact and err.max_rel > p.tolerance):
                if err is not None:
                    record.error = err.as_dict()
                    record.note = f"max_rel {err.max_rel:.3g} exceeds the exact-pass tolerance {p.tolerance:g}"
                record.status = "rolled-back"
                model = backup
            else:
                record.status, record.error = "applied", err.as_dict()
                ops, params, nbytes, fl = _snapshot(model, shapes)
                record.ops_after, record.params_after, record.bytes_after, record.flops_after = ops, params, nbytes, fl
                if keep_intermediate:
                    intermediates.append(copy_model(model))
        record.seconds = time.perf_counter() - start
        records.append(record)
    return PipelineResult(model=model, records=records, feeds=feeds, intermediates=intermediates, budget=budget_info)
