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

Measurement noise. The holdout is a sample, so every reading has a sampling error, and the
decision must not be finer than that error:

- Means over many outputs (cosine, rel, perplexity over thousands of predicted bytes) are
  compared as measured; their standard error over a few hundred held-out samples is small next
  to a 1% bound (gpt-text's perplexity change over 256 held-out windows: 0.08%, paired by window).
- A count of rare events is not: a zoo metric that counts changed predictions returns a
  :class:`Rate` (``changed`` of ``samples``), and the budget compares the rate's one-sided
  Wilson upper bound at :data:`CONFIDENCE` with its bound, not the point estimate. Over 72
  held-out images one changed prediction is already 1.4%, so a point estimate admits exactly the
  layers that change none of 72, which a 1.4% flip rate does 36% of the time; the bound says
  how many held-out samples a claim needs. At 90%, "rate <= 1%" needs at least 163 held-out
  samples with no change (0 of n: bound z^2 / (n + z^2)); at 95% it would need 269, more than a
  small validation split gives while leaving the passes enough to fit on. 90% one-sided means
  that a set of layers whose true rate is exactly at the bound passes about one time in ten;
  the bisection tries several nested sets on the same holdout, so the chosen set is a little
  luckier than one test says.
- How much is held out is a per-compile choice (``--budget-holdout FRACTION``, default 0.25):
  a pass that samples a few thousand activation rows (lookup: 4096 per layer input, 65 per
  vit-digits image) fits as well on a quarter of the calibration set as on three quarters, and
  the rest makes the budget's reading steadier. The compile report states the holdout's size
  and the rule used (:meth:`Budget.rule`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, NamedTuple

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError
from effc.ir import copy_model
from effc.verify import OrtRunner

Feeds = list[dict[str, np.ndarray]]
HOLDOUT_FRACTION = 0.25  # of the calibration samples, unless --budget-holdout says otherwise
CONFIDENCE = 0.90  # one-sided level of the upper bound on a count metric's rate (module docstring)
_SYNTAX = re.compile(r"^\s*(cosine|rel|metric)\s*(>=|<=)\s*([0-9.eE+-]+)\s*(%?)\s*$")
_DIRECTION = {"cosine": ">=", "rel": "<=", "metric": "<="}
_EXAMPLES = "'cosine>=0.99', 'rel<=0.01' or 'metric<=1%'"


class Rate(NamedTuple):
    """What a count metric measured: ``changed`` of ``samples`` held-out samples changed (e.g. their
    top-1 class). The budget reads it by its upper confidence bound (:class:`UpperBound`)."""

    changed: int
    samples: int


# (feeds, outputs, reference outputs) -> the relative change of a zoo model's task metric (0.01 = 1%),
# or a Rate for a metric that counts changed samples
Metric = Callable[[Feeds, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], "float | Rate"]


def wilson_upper(changed: int, samples: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided Wilson score upper bound of a binomial rate at ``confidence`` (0 of n: z^2 / (n + z^2))."""
    if samples <= 0:
        return 1.0
    z = NormalDist().inv_cdf(confidence)
    p, z2 = changed / samples, z * z
    centre = p + z2 / (2 * samples)
    spread = z * math.sqrt(p * (1 - p) / samples + z2 / (4 * samples * samples))
    return min(1.0, (centre + spread) / (1 + z2 / samples))


class UpperBound(float):
    """A count metric's reading as the budget compares it: the Wilson upper bound of its rate at
    CONFIDENCE (a float, so it sorts and compares as any reading), with the count it came from."""

    rate: Rate

    def __new__(cls, rate: Rate) -> UpperBound:
        reading = super().__new__(cls, wilson_upper(rate.changed, rate.samples))
        reading.rate = rate
        return reading


@dataclass(frozen=True)
class Budget:
    measure: str  # cosine | rel | metric
    bound: float  # metric: as a fraction (1% -> 0.01)
    text: str  # as the user wrote it
    metric: Metric | None = field(default=None, compare=False)
    holdout: float = HOLDOUT_FRACTION  # the fraction of the calibration samples held out to measure on
    counts: str | None = None  # a count metric: what it counts (the zoo's BUDGET_METRIC_COUNTS)

    @classmethod
    def parse(cls, text: str, zoo_name: str | None = None, holdout: float | None = None) -> Budget:
        """A budget from ``--budget`` text (and ``--budget-holdout``); EffcError (exit 2) for anything else."""
        fraction = HOLDOUT_FRACTION if holdout is None else holdout_fraction(holdout)
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
        metric = counts = None
        if measure == "metric":
            metric, counts = _zoo_metric(zoo_name, text)
            if not percent:
                raise EffcError(f"--budget '{text}': give the metric's allowed change as a percentage, e.g. 1%")
        return cls(measure, bound, text.strip(), metric, fraction, counts)

    def value(self, outputs: list[dict], reference: list[dict], feeds: Feeds) -> float:
        """The reading compared with the bound: the measure itself, or for a count metric the upper
        bound of its rate (an :class:`UpperBound`)."""
        if self.measure == "cosine":
            return output_cosine(outputs, reference)
        if self.measure == "rel":
            return output_rel(outputs, reference)
        got = self.metric(feeds, outputs, reference)
        return UpperBound(got) if isinstance(got, Rate) else float(got)

    def rule(self) -> str:
        """How a reading is compared with the bound, for the report."""
        if self.counts:
            return (f"{self.counts}: their rate's one-sided {CONFIDENCE:.0%} Wilson upper bound must be "
                    f"<= {self._bound_text()}")
        what = {"cosine": "mean output cosine", "rel": "relative output error",
                "metric": "the task metric's relative change"}[self.measure]
        return f"{what} on the held-out samples, as measured, must be {_DIRECTION[self.measure]} {self._bound_text()}"

    def _bound_text(self) -> str:
        return f"{self.bound:.2%}" if self.measure == "metric" else f"{self.bound:g}"

    def holds(self, value: float) -> bool:
        return value >= self.bound if self.measure == "cosine" else value <= self.bound

    def harm(self, value: float) -> float:
        """Larger is worse, whatever the measure's direction (to sort layers by)."""
        return -value if self.measure == "cosine" else value

    def show(self, value: float) -> str:
        if isinstance(value, UpperBound):
            return (f"{value.rate.changed} of {value.rate.samples} changed "
                    f"({CONFIDENCE:.0%} upper bound {float(value):.2%})")
        if self.measure == "metric":
            return f"metric change {value:.2%}"
        return f"{self.measure} {value:.4f}"

    def shortfall(self, value: float) -> str:
        """'cosine 0.9762 < 0.98': how ``value`` misses the bound."""
        if isinstance(value, UpperBound) and value.rate.changed == 0:  # the holdout is too small to tell
            return (f"{self.show(value)} > {self.bound:.2%}: too few held-out samples to show a rate within "
                    "the bound (--budget-holdout)")
        if self.measure == "metric":
            return f"{self.show(value)} > {self.bound:.2%}"
        return f"{self.show(value)} {'<' if self.measure == 'cosine' else '>'} {self.bound:g}"


def _zoo_metric(zoo_name: str | None, text: str) -> tuple[Metric, str | None]:
    """The zoo model's ``budget_metric`` and, for a count metric, what it counts."""
    if not zoo_name:
        raise EffcError(f"--budget '{text}': a metric budget needs a zoo model (zoo:NAME) with a task metric; "
                        "give 'cosine>=X' or 'rel<=X' for other models")
    from effc import zoo

    module = zoo.get(zoo_name)
    metric = getattr(module, "budget_metric", None)
    if metric is None:
        raise EffcError(f"--budget '{text}': zoo model '{zoo_name}' has no task metric on calibration data; "
                        "give 'cosine>=X' or 'rel<=X'")
    return metric, getattr(module, "BUDGET_METRIC_COUNTS", None)


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


def holdout_fraction(value) -> float:
    """``--budget-holdout``: a fraction strictly between 0 and 1; EffcError (exit 2) otherwise."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 < fraction < 1.0:  # also refuses nan
        raise EffcError(f"--budget-holdout {value}: give the fraction of the calibration samples to hold out, "
                        f"a number between 0 and 1 (default {HOLDOUT_FRACTION:g})")
    return fraction


def split(calibration: Feeds, fraction: float = HOLDOUT_FRACTION) -> tuple[Feeds, Feeds]:
    """(fit, holdout): the last ``fraction`` of the (already shuffled) calibration samples, rounded,
    is held out; both parts must keep at least one sample."""
    count = len(calibration)
    if count < 2:
        raise EffcError(f"--budget needs at least 2 calibration samples (one to fit on, one held out); "
                        f"the calibration set has {count}")
    held = int(round(count * fraction))
    if not 1 <= held <= count - 1:
        raise EffcError(f"--budget-holdout {fraction:g} of {count} calibration samples holds out {held}, "
                        f"leaving {'none to measure on' if held < 1 else 'none to fit on'}")
    return calibration[:-held], calibration[-held:]


def least_holdout(bound: float, confidence: float = CONFIDENCE) -> int:
    """The fewest held-out samples on which a count metric with no change at all reads within
    ``bound``: the upper bound of 0 of n is z^2 / (n + z^2), so n >= z^2 (1 - bound) / bound."""
    if bound <= 0:
        return math.inf
    z2 = NormalDist().inv_cdf(confidence) ** 2
    return math.ceil(z2 * (1 - bound) / bound - 1e-9)


def check_resolution(budget: Budget, fit: int, held: int) -> None:
    """EffcError (exit 2) before any pass runs where a count budget cannot hold on ``held`` samples
    whatever the passes do (even no changed sample reads above the bound): every layer would be
    refused after minutes of fitting, so say up front how much to hold out instead."""
    if not budget.counts or wilson_upper(0, held) <= budget.bound:
        return
    need, total = least_holdout(budget.bound), fit + held
    fraction = math.ceil(need / total * 100) / 100  # in hundredths, as a user types it
    leaves_fit = fraction < 1 and int(round(total * fraction)) < total
    advice = (f"pass --budget-holdout {fraction:g} or more" if leaves_fit
              else f"give more calibration samples (--calib), e.g. {math.ceil(need / 0.75)} with --budget-holdout 0.75")
    raise EffcError(f"--budget '{budget.text}' counts {budget.counts}: even none changed of {held} held-out "
                    f"samples reads {wilson_upper(0, held):.2%} at its {CONFIDENCE:.0%} upper bound, above "
                    f"{budget.bound:.2%}; it needs at least {need} held out: {advice}")


def summary(budget: Budget, fit: int, held: int) -> dict:
    """What the report says about the budget: its text, the holdout's size and the rule applied."""
    return {"budget": budget.text, "holdout_fraction": budget.holdout, "holdout_samples": held,
            "fit_samples": fit, "rule": budget.rule()}


def summary_line(info: dict) -> str:
    return (f"budget {info['budget']}: measured on {info['holdout_samples']} held-out calibration samples "
            f"({info['holdout_fraction']:g} of {info['holdout_samples'] + info['fit_samples']}; the passes fit on "
            f"the other {info['fit_samples']}); {info['rule']}")


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
