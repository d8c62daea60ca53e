"""The pass contract: a named rewrite that says what it changed and why it skipped the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from effc.passes.options import NoOptions, read, specs

_NEED_FLAGS = {"calibration": "calibration data: give --calib FILE.npz or zoo:NAME"}


@dataclass
class Skip:
    """A candidate the pass looked at and left alone, with the reason."""

    node: str
    reason: str


@dataclass
class Rewrite:
    """One change a pass made, as data: the node (or site) it is about, what was done, and the
    figures behind it. ``effc.report`` turns it into text; nothing else should."""

    node: str
    action: str  # kebab-case verb phrase, e.g. "fold-after", "recentre", "shift-add"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerRecord:
    """What a lossy pass measured for one layer it rewrote: the layer's output against the float
    layer's on the same inputs (the float model's activations on ``data``), and its constants' size."""

    node: str
    rel_error: float | None  # ||y_new - y|| / ||y|| over every row of ``data``
    cosine: float | None     # cosine of y_new and y, flattened
    bytes_before: int
    bytes_after: int
    data: str                # what the error was measured on: "calibration (N samples)", ...


@dataclass
class PassOutcome:
    """What a pass reports about itself: the rewrites it made, the candidates it skipped and (lossy
    passes) what each rewritten layer lost.

    The runner, not the pass, measures op counts, sizes and numerical error afterwards.
    """

    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)  # lossy passes: one per layer rewritten

    def rewrite(self, node: ir.Node | str, action: str, **details: Any) -> Rewrite:
        name = node if isinstance(node, str) else (node.name or node.op_type)
        self.rewrites.append(Rewrite(name, action, details))
        return self.rewrites[-1]

    def skip(self, node: ir.Node | str, reason: str) -> None:
        name = node if isinstance(node, str) else (node.name or node.op_type)
        self.skipped.append(Skip(name, reason))

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)


@dataclass
class PassContext:
    """What the runner gives a pass besides the model: its own options (an instance of the pass's
    ``Options``; a dict of option values is accepted too, see ``Pass.read_options``) and
    calibration inputs."""

    options: Any = None
    calibration: list[dict[str, Any]] | None = None
    # --budget (effc.budget.Budget): a budgeted pass converts only the layers that keep the model's outputs
    # within it on ``holdout``, a split of the calibration data held back from ``calibration``; the
    # original model's outputs on it are ``holdout_reference`` (every pass measures against the same).
    budget: Any = None
    holdout: list[dict[str, Any]] | None = None
    holdout_reference: list[dict[str, Any]] | None = None


class Pass:
    """Base class. Subclasses set ``name`` (kebab-case), ``exact`` and ``summary``, declare their
    options as one dataclass in ``Options`` (fields made with :func:`effc.passes.options.option`)
    and implement ``run``. ``needs``: what the pass cannot run without ("calibration"); an option
    declared with ``needs=`` adds its need while it is true.

    ``run`` mutates the model in place and returns a :class:`PassOutcome`. A pass that makes no
    rewrite must leave the model untouched (the runner restores it anyway, to be safe).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool]
    needs: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    budgeted: ClassVar[bool] = False  # chooses its layers under --budget (effc.budget.choose_layers)
    # Exact passes are held to this relative deviation from the original model (fp32).
    tolerance: ClassVar[float] = 1e-4

    @classmethod
    def read_options(cls, values: Any = None) -> Any:
        """This pass's checked options from an ``Options`` instance, a dict of values, or None."""
        return read(cls.name, cls.Options, values)

    @classmethod
    def missing(cls, opts: Any, have: set[str]) -> str | None:
        """Why the pass cannot run with ``opts`` given only the inputs in ``have``, or None."""
        for need in cls.needs:
            if need not in have:
                return f"pass '{cls.name}' needs {_NEED_FLAGS.get(need, need)}"
        for spec in specs(cls.Options):
            if spec.needs and spec.needs not in have and getattr(opts, spec.name) is True:
                return (f"{cls.name}.{spec.name}=true needs {_NEED_FLAGS.get(spec.needs, spec.needs)}, "
                        f"or --set {cls.name}.{spec.name}=false")
        return None

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")
