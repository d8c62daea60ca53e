"""Typed pass options: each pass declares one dataclass of them, and this module reads, checks and lists them.

A field is declared with :func:`option` (default, help, and a range or a set of choices); its type
comes from the annotation (bool, int, float, str, each optionally ``| None``). Values arrive as
text from the command line (``--set shift-add.bits=2``) or as JSON values from a recipe, and are
checked here, so a pass receives only a valid object of its own options.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from effc.errors import EffcError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, needs: str | None = None) -> Any:
    """A dataclass field for a pass option. ``low``/``high`` bound numbers (inclusive); ``choices``
    lists the accepted values; ``needs="calibration"`` on a bool: while it is true, the pass refuses
    to run without calibration data."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "needs": needs}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class NoOptions:
    """The options of a pass that has none."""


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: type
    optional: bool  # None is accepted (and means "not set")
    default: Any
    help: str
    choices: tuple | None
    low: float | None
    high: float | None
    needs: str | None

    @property
    def type_name(self) -> str:
        return self.type.__name__ + (" | none" if self.optional else "")

    @property
    def accepts(self) -> str:
        """What values it takes, in words: "one of 2, 3, 4", "1 or more", "in [2, 4]", "true or false"."""
        if self.choices is not None:
            return "one of " + ", ".join(_show(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        if self.low is not None and self.high is not None:
            return f"in [{_show(self.low)}, {_show(self.high)}]"
        if self.low is not None:
            return f"{_show(self.low)} or more"
        if self.high is not None:
            return f"{_show(self.high)} or less"
        return "any " + self.type.__name__


def specs(cls: type) -> list[OptionSpec]:
    """The declared options of an options dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, optional = _unwrap(hints[f.name])
        m = f.metadata
        out.append(OptionSpec(f.name, base, optional, f.default, m.get("help", ""), m.get("choices"),
                              m.get("low"), m.get("high"), m.get("needs")))
    return out


def _unwrap(hint) -> tuple[type, bool]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and len(args) == 1 and len(typing.get_args(hint)) == 2:  # X | None
        return args[0], True
    return hint, False


def build(pass_name: str, cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` from ``values`` (text or typed), every value checked; EffcError
    (one line, naming what is accepted) on an unknown name or a bad value."""
    by_name = {s.name: s for s in specs(cls)}
    typed = {}
    for name, value in values.items():
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise EffcError(f"pass '{pass_name}' has no option '{name}' (its options: {known})")
        typed[name] = convert(pass_name, spec, value)
    return cls(**typed)


def read(pass_name: str, cls: type, values: Any) -> Any:
    """``values`` as a checked ``cls``: an instance of it, a dict of option values, or None (the defaults)."""
    return check(pass_name, values) if isinstance(values, cls) else build(pass_name, cls, dict(values or {}))


def check(pass_name: str, opts: Any) -> Any:
    """``opts`` itself, after checking each of its values (an options object built in code)."""
    for spec in specs(type(opts)):
        convert(pass_name, spec, getattr(opts, spec.name))
    return opts


def convert(pass_name: str, spec: OptionSpec, value: Any) -> Any:
    """``value`` (text from the command line, or a JSON value) as the option's type, range checked."""
    where = f"{pass_name}.{spec.name}"
    wanted = f"{spec.type_name}, {spec.accepts}"
    if value is None or (isinstance(value, str) and spec.optional and value.strip().lower() == "none"):
        if spec.optional:
            return None
        raise EffcError(f"{where}: needs a value ({wanted})")
    try:
        typed = _as_type(spec.type, value)
    except (TypeError, ValueError):
        raise EffcError(f"{where}={_show(value)}: not a {spec.type.__name__} ({wanted})") from None
    if spec.choices is not None and typed not in spec.choices:
        raise EffcError(f"{where}={_show(value)}: not accepted ({wanted})")
    if (spec.low is not None and typed < spec.low) or (spec.high is not None and typed > spec.high):
        raise EffcError(f"{where}={_show(value)}: out of range ({wanted})")
    return typed


def _as_type(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(value)
    if isinstance(value, bool):  # True is an int to Python, not to a user
        raise TypeError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if not isinstance(value, str) else int(value.strip(), 10)
    if kind is float:
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(f"unsupported option type {kind}")


def as_dict(opts: Any) -> dict[str, Any]:
    """The options as JSON values (for the recipe)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def changed(opts: Any) -> dict[str, Any]:
    """Only the options that differ from their defaults."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if getattr(opts, f.name) != f.default}


def parse_settings(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``["shift-add.bits=2", ...]`` -> ``{"shift-add": {"bits": "2"}}`` (values still text;
    names are checked against the passes by the caller). A later setting of the same option wins."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        pass_name, dot, name = key.strip().rpartition(".")
        if not eq or not dot or not pass_name or not name:
            raise EffcError(f"--set {item}: expected PASS.OPTION=VALUE (e.g. --set shift-add.bits=2)")
        out.setdefault(pass_name, {})[name.strip().replace("-", "_")] = value.strip()
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return str(value)
