"""The pass contract: a named rewrite that says what it changed and why it skipped the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir


@dataclass
class Skip:
    """A candidate the pass looked at and left alone, with the reason."""

    node: str
    reason: str


@dataclass
class PassOutcome:
    """What a pass reports about itself: the rewrites it made and the candidates it skipped.

    The runner, not the pass, measures op counts, sizes and numerical error afterwards.
    """

    rewrites: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def skip(self, node: ir.Node | str, reason: str) -> None:
        name = node if isinstance(node, str) else (node.name or node.op_type)
        self.skipped.append(Skip(name, reason))

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)


@dataclass
class PassContext:
    """What the runner gives a pass besides the model: options and calibration inputs."""

    options: dict[str, Any] = field(default_factory=dict)
    calibration: list[dict[str, Any]] | None = None


class Pass:
    """Base class. Subclasses set ``name`` (kebab-case), ``exact`` and ``summary`` and implement ``run``.

    ``run`` mutates the model in place and returns a :class:`PassOutcome`. A pass that makes no
    rewrite must leave the model untouched (the runner restores it anyway, to be safe).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool]
    needs: ClassVar[tuple[str, ...]] = ()
    # Exact passes are held to this relative deviation from the original model (fp32).
    tolerance: ClassVar[float] = 1e-4

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")
