"""What `effc compile` will do, from its flags and an optional recipe: passes, their options, data, target.

Pass options are set as ``--set PASS.OPTION=VALUE``; today's shift-add flags and ``--no-untie`` are
aliases of such settings. A recipe (``--recipe FILE``) supplies every setting not given on the
command line; each one the command line changes is said in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from effc.errors import EffcError
from effc.passes import REGISTRY, get_pass, parse_pass_list
from effc.passes.options import build, convert, parse_settings, specs
from effc.recipe import Recipe, source_of

# compile flag (click's parameter name) -> (pass, option, value the flag stands for; None: the flag's own)
ALIASES: dict[str, tuple[str, str, Any]] = {
    "bits": ("shift-add", "bits", None),
    "group": ("shift-add", "group", None),
    "layers": ("shift-add", "layers", None),
    "avg_bits": ("shift-add", "avg_bits", None),
    "no_untie": ("layernorm-to-rmsnorm", "untie", False),
}
FLAG_OF = {"avg_bits": "--avg-bits", "no_untie": "--no-untie"}

# compile flags a recipe supplies when they are not on the command line
RECIPE_FLAGS = ("calib", "opset", "inputs", "target", "arch", "records", "budget", "budget_holdout", "precision")


@dataclass
class Plan:
    recipe: Recipe  # the settings to compile with (written to OUT/recipe.json once data hashes are known)
    passes: list  # Pass objects, in order
    options: dict[str, dict[str, Any]]  # pass -> option values (checked again by the pipeline)
    from_recipe: set[str] = field(default_factory=set)  # settings taken from a recipe file (hash-checked)
    overridden: list[str] = field(default_factory=list)  # "what (recipe: value)" for each override
    budget: Any = None  # the parsed --budget (effc.budget.Budget), set once the model is known


def explicit_options(sets: tuple[str, ...], flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pass -> {option: value} from ``--set`` and the alias flags, every name and value checked
    (an alias and a ``--set`` of the same option must agree)."""
    chosen: dict[str, dict[str, Any]] = {}
    for pass_name, values in parse_settings(sets).items():
        if pass_name not in REGISTRY:
            get_pass(pass_name)  # raises, naming the known passes
        build(pass_name, REGISTRY[pass_name].Options, values)  # names and values, before any work
        chosen[pass_name] = {k: _typed(pass_name, k, v) for k, v in values.items()}
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        pass_name, name, stands_for = ALIASES[flag]
        try:
            typed = _typed(pass_name, name, stands_for if stands_for is not None else value)
        except EffcError as exc:  # say it as the user typed it
            raise EffcError(f"{FLAG_OF.get(flag, '--' + flag)} {value} (= --set {pass_name}.{name}): "
                            f"{str(exc).split(': ', 1)[-1]}") from None
        earlier = chosen.setdefault(pass_name, {})
        if name in earlier and earlier[name] != typed:
            raise EffcError(f"{FLAG_OF.get(flag, '--' + flag)} and --set {pass_name}.{name}={earlier[name]} "
                            f"disagree; give one")
        earlier[name] = typed
    return chosen


def _typed(pass_name: str, name: str, value: Any) -> Any:
    spec = {s.name: s for s in specs(REGISTRY[pass_name].Options)}[name]
    return convert(pass_name, spec, value)


def _as_recorded(flag: str, value: Any) -> Any:
    """A flag's value as a recipe records it (data and record files by absolute path)."""
    if flag in ("calib", "inputs") or (flag == "records" and value not in ("shipped", "none")):
        return source_of(value)
    return value


def plan(given: dict[str, Any], on_command_line: set[str], options: dict[str, dict[str, Any]],
         recipe: Recipe | None) -> Plan:
    """The compile's settings: ``given`` (every flag's value, defaults included) where it was on the
    command line or there is no recipe, else the recipe's; ``options`` (explicit) over the recipe's."""
    if recipe is None:
        names = [p.name for p in parse_pass_list(given["passes"])]
        settings = Recipe(passes=names, **{k: given[k] for k in RECIPE_FLAGS})
        return Plan(settings, [get_pass(n) for n in names], options)
    overridden, from_recipe = [], set()
    if "passes" in on_command_line:
        names = [p.name for p in parse_pass_list(given["passes"])]
        if names != recipe.passes:
            overridden.append(f"--passes {','.join(names) or 'none'} (recipe: {','.join(recipe.passes) or 'none'})")
    else:
        names = list(recipe.passes)
    values = {}
    for flag in RECIPE_FLAGS:
        if flag in on_command_line:
            values[flag] = given[flag]
            same = _as_recorded(flag, given[flag]) == getattr(recipe, flag)
            if not same:
                overridden.append(f"--{flag.replace('_', '-')} {given[flag]} (recipe: {getattr(recipe, flag)})")
        else:
            values[flag] = getattr(recipe, flag)
            from_recipe.add(flag)
    merged: dict[str, dict[str, Any]] = {}
    for name in names:
        base = dict(recipe.options.get(name, {}))
        for option, value in options.get(name, {}).items():
            if option in base and base[option] != value:
                overridden.append(f"{name}.{option}={value} (recipe: {base[option]})")
            base[option] = value
        if base:
            merged[name] = base
    merged.update({k: v for k, v in options.items() if k not in merged})  # refused later: pass not run
    settings = Recipe(passes=names, **values, calib_hash=recipe.calib_hash, inputs_hash=recipe.inputs_hash,
                      model=recipe.model)
    for name in names:
        if name not in REGISTRY:
            get_pass(name)  # a recipe naming a pass this effc lacks
    return Plan(settings, [get_pass(n) for n in names], merged, from_recipe, overridden)
