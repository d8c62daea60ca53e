"""The accuracy budget shared by the lossy passes: which layers to convert, measured on held-out data.

``effc compile --budget 'cosine>=0.99'`` (or ``rel<=0.01``, or ``metric<=1%`` for a zoo model with
a task metric) bounds how far the model's outputs may move. The pipeline holds back a split of the
calibration data that no pass fits on (:func:`split`); a lossy pass hands :func:`choose_layers` one
:class:`Candidate` per layer it could convert, and gets back the layers to convert and, for every
other, the measured reason it stays in float.

Order: each layer's effect on the outputs is measured alone, and layers are added least harmful
first. The longest prefix of that order within budget is found by bisection (few runs, as errors
mostly add up), then every remaining layer is tried once on top, in order, and kept if the budget
still holds: a layer that alone is harmless may still break the budget on top of the others, and
is then listed with the figure it would have given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import copy_model
from effc.verify import OrtRunner

Feeds = list[dict[str, np.ndarray]]
HOLDOUT_FRACTION = 0.25
_SYNTAX = re.compile(r"^\s*(cosine|rel|metric)\s*(>=|<=)\s*([0-9.eE+-]+)\s*(%?)\s*$")
_DIRECTION = {"cosine": ">=", "rel": "<=", "metric": "<="}
_EXAMPLES = "'cosine>=0.99', 'rel<=0.01' or 'metric<=1%'"

# (feeds, outputs, reference outputs) -> the relative change of a zoo model's task metric (0.01 = 1%)
Metric = Callable[[Feeds, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], float]


@dataclass(frozen=True)
class Budget:
    measure: str  # cosine | rel | metric
    bound: float  # metric: as a fraction (1% -> 0.01)
    text: str  # as the user wrote it
    metric: Metric | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str, zoo_name: str | None = None) -> Budget:
        """A budget from ``--budget`` text; EffcError (exit 2) for anything else."""
        match = _SYNTAX.match(text or "")
        if not match:
            raise EffcError(f"--budget '{text}': expected {_EXAMPLES}")
        measure, op, number, percent = match.groups()
        if op != _DIRECTION[measure]:
            raise EffcError(f"--budget '{text}': {measure} is bounded with '{_DIRECTION[measure]}'")
        try:
            bound = float(number) / (100.0 if percent else 1.0)
        except ValueError:
            raise EffcError(f"--budget '{text}': '{number}' is not a number") from None
        if percent and measure != "metric":
            raise EffcError(f"--budget '{text}': only a metric budget is a percentage")
        if measure == "cosine" and not 0.0 < bound <= 1.0:
            raise EffcError(f"--budget '{text}': a cosine bound lies in (0, 1]")
        if bound < 0 or not np.isfinite(bound):
            raise EffcError(f"--budget '{text}': the bound must be a finite number >= 0")
        metric = None
        if measure == "metric":
            metric = _zoo_metric(zoo_name, text)
            if not percent:
                raise EffcError(f"--budget '{text}': give the metric's allowed change as a percentage, e.g. 1%")
        return cls(measure, bound, text.strip(), metric)

    def value(self, outputs: list[dict], reference: list[dict], feeds: Feeds) -> float:
        if self.measure == "cosine":
            return output_cosine(outputs, reference)
        if self.measure == "rel":
            return output_rel(outputs, reference)
        return float(self.metric(feeds, outputs, reference))

    def holds(self, value: float) -> bool:
        return value >= self.bound if self.measure == "cosine" else value <= self.bound

    def harm(self, value: float) -> float:
        """Larger is worse, whatever the measure's direction (to sort layers by)."""
        return -value if self.measure == "cosine" else value

    def show(self, value: float) -> str:
        if self.measure == "metric":
            return f"metric change {value:.2%}"
        return f"{self.measure} {value:.4f}"

    def shortfall(self, value: float) -> str:
        """'cosine 0.9762 < 0.98': how ``value`` misses the bound."""
        if self.measure == "metric":
            return f"metric change {value:.2%} > {self.bound:.2%}"
        return f"{self.show(value)} {'<' if self.measure == 'cosine' else '>'} {self.bound:g}"


def _zoo_metric(zoo_name: str | None, text: str) -> Metric:
    if not zoo_name:
        raise EffcError(f"--budget '{text}': a metric budget needs a zoo model (zoo:NAME) with a task metric; "
                        "give 'cosine>=X' or 'rel<=X' for other models")
    from effc import zoo

    module = zoo.get(zoo_name)
    metric = getattr(module, "budget_metric", None)
    if metric is None:
        raise EffcError(f"--budget '{text}': zoo model '{zoo_name}' has no task metric on calibration data; "
                        "give 'cosine>=X' or 'rel<=X'")
    return metric


def output_cosine(outputs: list[dict], reference: list[dict]) -> float:
    """Per float output, the mean over samples of the cosine of the sample's output and its reference
    (as `effc eval` scores an embedding model); the smallest over outputs."""
    worst = 1.0
    for name in reference[0]:
        ref = [np.asarray(r[name], dtype=np.float64).ravel() for r in reference]
        if not np.issubdtype(np.asarray(reference[0][name]).dtype, np.floating):
            continue
        got = [np.asarray(o[name], dtype=np.float64).ravel() for o in outputs]
        cosines = []
        for g, r in zip(got, ref):
            denom = np.linalg.norm(g) * np.linalg.norm(r)
            cosines.append(float(g @ r / denom) if denom > 0 else float(np.array_equal(g, r)))
        value = float(np.mean(cosines)) if cosines else 1.0
        worst = min(worst, value if np.isfinite(value) else 0.0)
    return worst


def output_rel(outputs: list[dict], reference: list[dict]) -> float:
    """Per float output, ||y' - y|| / ||y|| over all samples; the largest over outputs."""
    worst = 0.0
    for name in reference[0]:
        if not np.issubdtype(np.asarray(reference[0][name]).dtype, np.floating):
            continue
        ref = np.concatenate([np.asarray(r[name], dtype=np.float64).ravel() for r in reference])
        got = np.concatenate([np.asarray(o[name], dtype=np.float64).ravel() for o in outputs])
        scale = np.linalg.norm(ref)
        rel = float(np.linalg.norm(got - ref) / scale) if scale > 0 else float(np.linalg.norm(got) > 0) * np.inf
        worst = max(worst, rel if np.isfinite(rel) else np.inf)
    return worst


def split(calibration: Feeds) -> tuple[Feeds, Feeds]:
    """(fit, holdout): the last quarter of the (already shuffled) calibration samples is held out."""
    if len(calibration) < 2:
        raise EffcError(f"--budget needs at least 2 calibration samples (one to fit on, one held out); "
                        f"the calibration set has {len(calibration)}")
    held = max(1, int(round(len(calibration) * HOLDOUT_FRACTION)))
    return calibration[:-held], calibration[-held:]


@dataclass
class Candidate:
    """A layer a lossy pass could convert. ``apply(model)`` converts this one layer in the model it is
    given, found by name (it is called on copies as well as on the pass's model)."""

    name: str
    apply: Callable[[ir.Model], object]
    cost: float | None = None  # the pass's local error for the layer: orders layers the budget cannot tell apart


@dataclass
class Choice:
    accepted: list[str]  # converted, in the order they were added
    refused: dict[str, str]  # layer -> why it stays in float
    value: float  # the measure with every accepted layer converted, on the holdout
    alone: dict[str, float]  # layer -> the measure with that layer alone converted
    samples: int  # holdout samples measured on


def convert_layers(model: ir.Model, candidates: list[Candidate], ctx, outcome) -> list[str]:
    """What a budgeted pass does with its candidates: convert every one in ``model`` without a budget;
    under ``ctx.budget`` those :func:`choose_layers` accepts, each other one skipped in ``outcome`` (a
    PassOutcome) with its measured reason. The names converted, in order."""
    if ctx.budget is None:
        for c in candidates:
            c.apply(model)
        return [c.name for c in candidates]
    choice = choose_layers(model, candidates, ctx.budget, ctx.holdout, reference=ctx.holdout_reference)
    for name, reason in choice.refused.items():
        outcome.skip(name, reason)
    return list(choice.accepted)


def choose_layers(model: ir.Model, candidates: list[Candidate], budget: Budget, holdout: Feeds,
                  progress: Callable[[str], None] | None = None, reference: list[dict] | None = None) -> Choice:
    """Convert (in ``model``, in place) the candidates that fit within ``budget`` on ``holdout``,
    least harmful first; the rest are refused with the measured reason.

    ``reference``: the ORIGINAL model's outputs on ``holdout`` (``ctx.holdout_reference``), so that
    passes run one after another share one budget; None measures against ``model`` as it stands."""
    say = progress or (lambda _text: None)
    reference = reference if reference is not None else OrtRunner(model).run_all(holdout)

    def measure(converted: list[Candidate], base: ir.Model = model) -> tuple[float, ir.Model]:
        trial = copy_model(base)
        for c in converted:
            c.apply(trial)
        return budget.value(OrtRunner(trial).run_all(holdout), reference, holdout), trial

    alone: dict[str, float] = {}
    for i, c in enumerate(candidates, 1):
        say(f"budget: measuring layer {i}/{len(candidates)} alone")
        alone[c.name] = measure([c])[0]
    # ties (layers that alone move nothing measurable) go by the pass's own local error, then by name
    order = sorted(candidates, key=lambda c: (budget.harm(alone[c.name]), np.inf if c.cost is None else c.cost,
                                              c.name))
    refused = {c.name: f"kept in float: alone it gives {budget.shortfall(alone[c.name])} on the holdout "
                       f"({len(holdout)} samples)" for c in order if not budget.holds(alone[c.name])}
    fitting = [c for c in order if c.name not in refused]

    # the longest prefix of the order within budget, by bisection
    lo, hi, working = 0, len(fitting), copy_model(model)
    value = budget.value(OrtRunner(model).run_all(holdout), reference, holdout)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        say(f"budget: trying the {mid} least harmful of {len(fitting)} layers")
        got, trial = measure(fitting[:mid])
        if budget.holds(got):
            lo, value, working = mid, got, trial
        else:
            hi = mid - 1
    accepted = [c.name for c in fitting[:lo]]
    for c in fitting[lo:]:  # each of the rest once more, on top of what was accepted
        say(f"budget: trying {c.name} on top of {len(accepted)} layers")
        got, trial = measure([c], working)
        if budget.holds(got):
            accepted.append(c.name)
            value, working = got, trial
        else:
            refused[c.name] = (f"kept in float: with it (after {len(accepted)} converted layers) "
                               f"{budget.shortfall(got)} on the holdout ({len(holdout)} samples)")
    by_name = {c.name: c for c in candidates}
    for name in accepted:
        by_name[name].apply(model)
    return Choice(accepted, refused, value, alone, len(holdout))
