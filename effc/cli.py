"""effc command line: compile, inspect, diff, passes, eval, zoo."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from effc.errors import EffcError, EffcFault


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, width=_width())


def _width() -> int | None:
    # rich assumes 80 columns when not on a terminal, which wraps the pass table into mush
    return None if sys.stdout.isatty() else 160


def _load_model(spec: str, opset: int | None = None):
    """MODEL is a file path, or zoo:NAME for a zoo model built into the cache."""
    from effc.frontend.onnx import load

    if spec.startswith("zoo:"):
        from effc.zoo.cache import cached_model_path

        return load(cached_model_path(spec[4:]), opset=opset), spec[4:]
    return load(spec, opset=opset), None


def pass_feeds(zoo_name: str | None) -> list[dict] | None:
    """The inputs passes are measured on when none are given: a zoo model's samples, else None
    (the pipeline's seeded random inputs). `effc tune` uses the same, so that it rewrites the model
    exactly as `effc compile` does."""
    if not zoo_name:
        return None
    from effc import zoo

    return zoo.get(zoo_name).sample_inputs(2, 0)


def _read_feeds(path: str) -> list[dict]:
    """An .npz of model inputs: one array per input, first axis = samples."""
    import numpy as np

    try:
        data = np.load(path)
    except Exception as exc:
        raise EffcError(f"{path}: not an .npz of inputs ({exc})") from None
    names = list(data.files)
    if not names:
        raise EffcError(f"{path}: holds no arrays")
    count = len(data[names[0]])
    return [{n: data[n][i:i + 1] for n in names} for i in range(count)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="effc")
def cli() -> None:
    """effc: rewrite trained transformers into cheaper, equivalent (or budgeted) forms."""


@cli.command("compile")
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--passes", "passes", default=None, help="Comma-separated pass names (default: the exact passes; none: no pass).")
@click.option("--set", "sets", multiple=True, metavar="PASS.OPTION=VALUE",
              help="Set one option of one pass (repeatable), e.g. --set shift-add.bits=2; `effc passes -v` lists them.")
@click.option("--recipe", "recipe", type=click.Path(dir_okay=True), default=None,
              help="Compile as the recipe says (an OUT/recipe.json, or an OUT): passes, options, calibration, "
              "opset, inputs, target; flags given here override it.")
@click.option("--opset", type=int, default=None, help="Convert the model to this opset first.")
@click.option("--inputs", "inputs", type=click.Path(exists=True, dir_okay=False), default=None,
              help=".npz of inputs used to measure each pass (default: seeded random inputs).")
@click.option("--keep-intermediate", is_flag=True, help="Also write the model after every pass.")
@click.option("--no-untie", is_flag=True, help="= --set layernorm-to-rmsnorm.untie=false: refuse rather than untie "
              "shared weights.")
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default=None,
              help="Also build OUT/model.so (+ params) with TVM for this target.")
@click.option("--arch", default=None, help="CUDA arch for --target cuda: sm_80, sm_90, ...")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the built module against ONNX Runtime on the exported model; beyond 1e-4 (scale-relative) "
              "exit 1 naming the first wrong kernel, leaving no module behind.")
@click.option("--records", "records", default="shipped", show_default=True,
              help="Tuning records for --target llvm: a file from `effc tune`, `shipped` (effc's records "
              "for this CPU family, when it has some) or `none` (the rules' built-in knobs).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
              help="Float matmuls for --target llvm: fp32; bf16 (bf16 operands, fp32 accumulation, on CPUs with "
              "AVX-512 BF16; fp32 elsewhere); auto (bf16 where the CPU has it). Verified against fp32 ONNX Runtime "
              "at a bf16 tolerance; codegen.json records what was taken and the deviation.")
@click.option("--calib", "calib", default=None, help="Calibration inputs for lossy passes: an .npz "
              "(one array per input, first axis = samples) or zoo:NAME (that model's calibration set).")
@click.option("--budget", "budget", default=None, metavar="BOUND",
              help="Accuracy budget for the lossy passes: 'cosine>=0.99' or 'rel<=0.01' on the model's outputs, or "
              "'metric<=1%' for a zoo model with a task metric. Measured on a held-out part of --calib (a quarter, "
              "or --budget-holdout); layers that would break it stay in float, each with its measured reason.")
@click.option("--budget-holdout", "budget_holdout", type=float, default=None, metavar="FRACTION",
              help="The fraction of --calib held out for --budget to measure on (default 0.25); the passes fit "
              "on the rest. Hold out more where the budget's reading is coarse (a count of changed "
              "predictions) and the passes need few samples to fit.")
@click.option("--bits", type=int, default=None,
              help="= --set shift-add.bits=N: bit planes per weight (2-4, default 3).")
@click.option("--group", type=int, default=None, help="= --set shift-add.group=N: input columns per scale (default 8).")
@click.option("--layers", default=None, help="= --set shift-add.layers=GLOB: node names of the linears to rewrite.")
@click.option("--avg-bits", "avg_bits", type=float, default=None,
              help="= --set shift-add.avg_bits=X: allocate bits per layer under this average.")
@click.option("--max-memory", "max_memory", default=None, help="Refuse a model whose tensors need more than this "
              "(512M, 8G, ...; default: EFFC_MAX_MEMORY, else the lesser of a quarter of the physical memory and half "
              "the available memory).")
def compile_cmd(model: str, out: str, passes: str | None, sets: tuple[str, ...], recipe: str | None,
                opset: int | None, inputs: str | None, keep_intermediate: bool, no_untie: bool, target: str | None,
                arch: str | None, calib: str | None, bits: int | None, group: int | None, layers: str | None,
                avg_bits: float | None, records: str | None, max_memory: str | None, verify: bool,
                budget: str | None, budget_holdout: float | None, precision: str) -> None:
    """Run passes on MODEL (.onnx, .pt2 or zoo:NAME); write OUT/model.onnx, OUT/report.json and
    OUT/recipe.json (what `--recipe` and `effc tune OUT` read)."""
    from click.core import ParameterSource

    from effc import cli_settings, recipe as recipes
    from effc.outdir import StagedOut
    from effc.pipeline import check_budget, pass_options

    click_ctx = click.get_current_context()
    given = {"passes": passes, "calib": calib, "opset": opset, "inputs": inputs, "target": target, "arch": arch,
             "records": records, "budget": budget, "budget_holdout": budget_holdout, "precision": precision}
    on_command_line = {k for k in given if click_ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    options = cli_settings.explicit_options(sets, {"bits": bits, "group": group, "layers": layers,
                                                   "avg_bits": avg_bits, "no_untie": no_untie})
    plan = cli_settings.plan(given, on_command_line, options, recipes.load(recipe) if recipe else None)
    settings = plan.recipe
    # names, options and needs (calibration) checked before any expensive work
    plan.options = pass_options(plan.passes, plan.options, bool(settings.calib))
    plan.budget = parse_budget(settings.budget, model, settings.budget_holdout)
    check_budget(plan.passes, plan.budget, bool(settings.calib))
    if settings.inputs and not Path(settings.inputs).is_file():
        raise EffcError(f"--inputs: no such file '{settings.inputs}'")
    if max_memory:
        from effc import memory_guard

        memory_guard.set_limit(memory_guard.parse_size(max_memory))
    if settings.target:
        from effc.codegen.target import check_target_args

        check_target_args(settings.target, settings.arch)
    from effc.codegen.precision import check_precision

    check_precision(settings.precision, settings.target)
    if settings.records not in ("shipped", "none") and not Path(settings.records).is_file():
        raise EffcError(f"--records: no such file '{settings.records}' (or say `shipped` or `none`)")
    console = _console()
    if plan.overridden:
        console.print(f"recipe {recipe}: the command line overrides " + "; ".join(plan.overridden), markup=False)
    if recipe and plan.recipe.model and _source(model) != plan.recipe.model:
        console.print(f"recipe {recipe} was made on {plan.recipe.model}; compiling {model} with it", markup=False)
    with StagedOut(out, protect=_input_files(model)) as stage:  # OUT is replaced as a whole, or not at all
        result, feeds, built = _compile_into(stage.path, console, model, plan, keep_intermediate)
        # The built module is checked in the staging directory: a disagreement raises, which leaves the
        # previous OUT as it was and removes the staged module with everything else.
        verdict = (_verify_build(console, stage.path, result.model, feeds, settings.target, settings.arch,
                                 settings.records, built.precision) if built and verify else None)
        out_dir = stage.commit()
    from effc.report import load_report, reason_lines, render_table

    report = load_report(out_dir / "report.json")
    console.print(render_table(report))  # after the swap: refusals stay one line
    for line in reason_lines(report):
        console.print(line, markup=False)
    if report.get("budget"):
        from effc.budget import summary_line

        console.print(summary_line(report["budget"]), markup=False)
    console.print(f"wrote {out_dir / 'model.onnx'}, {out_dir / 'report.json'} and {out_dir / recipes.NAME}")
    if built is not None:
        console.print(f"wrote {out_dir / 'model.so'} for {settings.target} in {built.seconds:.0f} s"
                      + (f" (TVM's messages: {out_dir / 'build.log'})" if (out_dir / "build.log").exists() else ""))
        if built.custom_summary:
            console.print(built.custom_summary)
        if settings.target == "llvm":
            console.print(f"precision {built.precision}: {built.precision_reason}", markup=False)
        _print_rule_problems(console, built)
        console.print(verdict if verify else "not verified against ONNX Runtime (--no-verify)")


def _source(model: str) -> str:
    """MODEL as report.json and recipe.json record it: zoo:NAME, or an absolute path (found again from any cwd)."""
    return model if model.startswith("zoo:") else os.path.abspath(model)


def _input_files(model: str) -> list[Path]:
    if model.startswith("zoo:"):
        return []
    from effc.frontend.onnx import source_files

    return source_files(model)


def parse_budget(text: str | None, model: str, holdout: float | None = None):
    """The --budget of a compile of ``model`` (a metric budget needs zoo:NAME), or None."""
    if text is None:
        if holdout is not None:
            raise EffcError("--budget-holdout applies only with --budget")
        return None
    from effc.budget import Budget

    return Budget.parse(text, model[4:] if model.startswith("zoo:") else None, holdout)


def load_calibration(spec: str | None):
    """Calibration inputs from an .npz or zoo:NAME, or None."""
    if not spec:
        return None
    from effc.calib import load_npz, zoo_calibration

    return zoo_calibration(spec[4:]) if spec.startswith("zoo:") else load_npz(spec)


def _compile_into(stage: Path, console, model: str, plan, keep_intermediate: bool):
    """Load, run the passes and (with a target) build as ``plan`` says, writing everything into
    ``stage``: (the pipeline's result, the feeds it was measured on or None, the BuildResult or None)."""
    from effc import recipe as recipes
    from effc.ir import save
    from effc.passes.options import as_dict
    from effc.pipeline import run_pipeline
    from effc.report import write_report

    settings = plan.recipe
    target, arch, records = settings.target, settings.arch, settings.records
    with console.status(f"loading {model}"):
        ir_model, zoo_name = _load_model(model, settings.opset)
    from effc import memory_guard

    memory_guard.check(ir_model)  # first thing after loading: a memory bomb costs no further import
    feeds = _read_feeds(settings.inputs) if settings.inputs else pass_feeds(zoo_name)
    calibration = load_calibration(settings.calib)
    if "inputs" in plan.from_recipe and settings.inputs:
        recipes.check_hash("inputs", settings.inputs, feeds, settings.inputs_hash)
    if "calib" in plan.from_recipe and settings.calib:
        recipes.check_hash("calib", settings.calib, calibration, settings.calib_hash)
    options = plan.options
    with console.status("running passes") as status:
        result = run_pipeline(ir_model, plan.passes, feeds=feeds, options=options, calibration=calibration,
                              keep_intermediate=keep_intermediate, budget=plan.budget,
                              progress=lambda name: status.update(f"pass {name}"))
    save(result.model, stage / "model.onnx")
    if keep_intermediate:
        applied = [r for r in result.records if r.status == "applied"]
        for i, (rec, m) in enumerate(zip(applied, result.intermediates), 1):
            save(m, stage / "intermediate" / f"{i:02d}-{rec.name}.onnx")
    source = _source(model)
    write_report(stage / "report.json", source, result.records,
                 {"budget": result.budget} if result.budget else None)
    written = recipes.Recipe(passes=settings.passes, options={n: as_dict(o) for n, o in options.items()},
                             calib=recipes.source_of(settings.calib), calib_hash=recipes.feeds_hash(calibration),
                             opset=settings.opset, inputs=recipes.source_of(settings.inputs),
                             inputs_hash=recipes.feeds_hash(feeds) if settings.inputs else None,
                             target=target, arch=arch, model=source, budget=settings.budget,
                             budget_holdout=settings.budget_holdout,
                             precision=settings.precision,
                             records=records if records in ("shipped", "none") else recipes.source_of(records))
    recipes.write(stage / recipes.NAME, written)
    if not target:
        return result, feeds, None
    from effc.codegen.build import BUILD_LOG_NAME, compile_model
    from effc.native_log import native_stderr_to

    try:
        with console.status(f"building for {target}"), native_stderr_to(stage / BUILD_LOG_NAME):
            built = compile_model(result.model, target, stage, arch=arch, records=records, source=source,
                                  precision=settings.precision)
        return result, feeds, built
    except Exception:
        if _disk_full(stage):  # TVM reports a short write as its own InternalError
            raise OSError(errno.ENOSPC, "No space left on device", str(stage.parent)) from None
        raise


def _disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _print_rule_problems(console, built) -> None:
    """One line per schedule rule that failed on a kernel, and per kernel left to the generic rules."""
    for error in built.rule_errors:
        console.print(f"rule error: {error}")
    for kernel, rule in sorted(built.kernels.items()):
        if rule in ("fallback", "unscheduled"):
            console.print(f"kernel {kernel} is on the {rule} rule (no specific rule took it)")


def _verify_build(console, out_dir: Path, model, feeds, target: str, arch: str | None, records: str,
                  precision: str = "fp32") -> str:
    """The built module against ONNX Runtime: the line to print, or EffcFault (exit 1) on a disagreement."""
    from effc.codegen.check import verify_build
    from effc.codegen.target import gpu_present, make_target
    from effc.verify import make_inputs

    bt = make_target(target, arch)
    if bt.kind == "cuda" and not gpu_present():
        return "not verified against ONNX Runtime: no GPU here (`effc run` on a GPU machine can check it)"
    feeds = feeds or make_inputs(model, 2, seed=0)
    with console.status("verifying against ONNX Runtime"):
        dev = verify_build(out_dir, model, feeds, bt, records, precision=precision)
    if precision == "bf16":
        return (f"verified against fp32 ONNX Runtime on {len(feeds)} input(s) at the bf16 tolerance: max rel err "
                f"{dev.max_rel:.1e}, cosine {dev.cosine:.6f}")
    return f"verified against ONNX Runtime on {len(feeds)} input(s): max rel err {dev.max_rel:.1e}"


@cli.command("inspect")
@click.argument("out", type=click.Path())
@click.option("--layers", is_flag=True, help="Per-layer error and size of the lossy passes' rewrites, worst first.")
def inspect_cmd(out: str, layers: bool) -> None:
    """Print the per-pass table (and skip reasons) of a compile output directory or report.json."""
    from rich.console import Console

    from effc.report import layer_rows, load_report, render_layers, render_rewrite, render_table

    path = Path(out)
    report = load_report(path / "report.json" if path.is_dir() else path)
    console = Console(highlight=False, width=_width())
    if layers:
        if not layer_rows(report):
            console.print("no per-layer records: no lossy pass rewrote a layer")
            return
        console.print(render_layers(report))
        return
    console.print(render_table(report))
    for p in report.get("passes", []):
        for rewrite in p.get("rewrites", []):
            console.print(f"  [{p['name']}] {render_rewrite(rewrite)}", markup=False)
        for skip in p.get("skipped", []):
            console.print(f"  [{p['name']}] skipped {skip['node']}: {skip['reason']}", markup=False)
        if p.get("note"):
            console.print(f"  [{p['name']}] note: {p['note']}", markup=False)
    if report.get("budget"):
        from effc.budget import summary_line

        console.print(summary_line(report["budget"]), markup=False)


@cli.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--all", "show_all", is_flag=True, help="List every changed initializer (default: the first 8).")
def diff_cmd(a: str, b: str, show_all: bool) -> None:
    """Op-level differences between two ONNX models."""
    from effc.diff import diff_models, render_diff
    from effc.frontend.onnx import load

    click.echo(render_diff(diff_models(load(a), load(b)), show_all=show_all))


@cli.command("passes")
@click.option("-v", "--verbose", is_flag=True,
              help="Also list each pass's options: type, default, accepted values, help.")
def passes_cmd(verbose: bool) -> None:
    """List the available passes (-v: with their options, set as --set PASS.OPTION=VALUE)."""
    from effc.passes import REGISTRY
    from effc.passes.options import specs

    for name, p in sorted(REGISTRY.items()):
        kind = "exact" if p.exact else "lossy"
        click.echo(f"{name:24s} {kind:6s} {p.summary}")
        if not verbose:
            continue
        if p.budgeted:
            click.echo("    budgeted: under --budget, converts only the layers that keep the outputs within it")
        options = specs(p.Options)
        if not options:
            click.echo("    (no options)")
        for o in options:
            default = str(o.default).lower() if isinstance(o.default, bool) or o.default is None else o.default
            needs = f" (true needs {o.needs})" if o.needs else ""
            click.echo(f"    {name + '.' + o.name:32s} {o.type_name:13s} default {str(default):6s} {o.accepts:18s} "
                       f"{o.help}{needs}")


@cli.command("eval")
@click.argument("model")
@click.option("--zoo", "zoo_name", default=None, help="Zoo model whose held-out data and metric to use "
              "(default: the zoo model MODEL is, or was compiled from).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also evaluate the model an `effc compile` OUT was made from (its report.json says which).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write {metric, value, zoo} (+ baseline).")
def eval_cmd(model: str, zoo_name: str | None, baseline: bool, json_path: str | None) -> None:
    """Compute a zoo model's task metric for MODEL (.onnx, an `effc compile` OUT, or zoo:NAME); for an OUT,
    the model it was compiled from is evaluated too and both are printed side by side."""
    import json

    from effc import zoo
    from effc.ir import atomic_write_text

    source = _compiled_from(model) if baseline else None
    zoo_name = zoo_name or _zoo_of(model) or _zoo_of(source or "")
    if not zoo_name:
        raise EffcError("--zoo NAME: say which zoo model's data and metric to use (`effc zoo list`)")
    module = zoo.get(zoo_name)
    if not hasattr(module, "evaluate"):
        raise EffcError(f"zoo model '{zoo_name}' has no task metric (random weights); try one with held-out data")
    value_of = {}
    with _console().status(f"evaluating {model} on {zoo_name}") as status:
        for label, spec in (("baseline", source), ("optimized" if source else "value", model)):
            if spec is not None:
                status.update(f"evaluating {spec} on {zoo_name}")
                metric, value_of[label] = _evaluate(module, zoo_name, spec)
    if source:
        base, opt = value_of["baseline"], value_of["optimized"]
        click.echo(f"{metric}: baseline {base:.6g}   optimized {opt:.6g}   ({opt - base:+.3g})")
        click.echo(f"  baseline: {source}")
    else:
        click.echo(f"{metric}: {value_of['value']:.6g}")
    if json_path:
        body = {"metric": metric, "value": value_of.get("optimized", value_of.get("value")), "zoo": zoo_name}
        if source:
            body.update(baseline=value_of["baseline"], baseline_model=source)
        atomic_write_text(Path(json_path), json.dumps(body) + "\n")


def _zoo_of(spec: str) -> str | None:
    return spec[4:] if spec.startswith("zoo:") else None


def _compiled_from(model: str) -> str | None:
    """What an `effc compile` OUT (or its model.onnx) was compiled from, when that is still there."""
    import json

    path = Path(model)
    report = (path if path.is_dir() else path.parent) / "report.json"
    if model.startswith("zoo:") or not report.is_file() or (path.is_file() and path.name != "model.onnx"):
        return None
    try:
        source = str(json.loads(report.read_text()).get("model", ""))
    except (ValueError, UnicodeDecodeError):
        return None
    if source.startswith("zoo:") or (source and Path(source).exists()):
        return source
    return None


def _evaluate(module, zoo_name: str, spec: str) -> tuple[str, float]:
    from effc.verify import OrtRunError, OrtRunner

    runner = _compiled_runner(spec) or OrtRunner(_load_model(spec)[0])
    wanted = set(module.sample_inputs(1, 0)[0])
    if not set(runner.input_names) <= wanted:
        raise EffcError(f"{spec} takes inputs {sorted(runner.input_names)}; zoo model '{zoo_name}' gives "
                        f"{sorted(wanted)}: its data does not fit this model (--zoo NAME)")
    try:
        return module.evaluate(runner)
    except OrtRunError as exc:
        raise EffcError(f"{spec} does not run on zoo model '{zoo_name}''s data ({exc.reason})") from None


def _compiled_runner(spec: str):
    """An `effc compile --target llvm` OUT runs as its compiled module (at its precision: a bf16 module
    is evaluated as built), not as its model.onnx; None for anything else."""
    import json

    from effc.codegen.runtime import MANIFEST, load_compiled

    manifest = Path(spec) / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text()).get("target") != "llvm":
        return None
    compiled = load_compiled(spec)
    compiled.input_names = [i["name"] for i in compiled.inputs]
    return compiled


@cli.group("zoo")
def zoo_group() -> None:
    """Reference models."""


@zoo_group.command("list")
def zoo_list() -> None:
    """List the zoo models."""
    from effc import zoo

    for name in zoo.MODELS:
        click.echo(f"{name:18s} {zoo.get(name).DESCRIPTION}")


@zoo_group.command("build")
@click.argument("name")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output .onnx file (large weights go to FILE.data beside it).")
def zoo_build(name: str, out: str) -> None:
    """Build zoo model NAME deterministically and write it to the .onnx file given by -o."""
    from effc import zoo
    from effc.ir import save

    module = zoo.get(name)
    with _console().status(f"building {name}"):
        save(module.build(), out)
    click.echo(f"wrote {out}")


@zoo_group.command("calib")
@click.argument("name")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="Output .npz file.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="Samples (default: 64; for a sentence encoder every calibration sentence, one per sample).")
@click.option("--seed", type=int, default=0, show_default=True)
def zoo_calib(name: str, out: str, count: int | None, seed: int) -> None:
    """Write zoo model NAME's calibration set (never its metric's data) to OUT (.npz)."""
    from effc.calib import save_npz, zoo_calibration

    feeds = zoo_calibration(name, count, seed)
    click.echo(f"wrote {save_npz(feeds, out)} ({len(feeds)} samples)")


# Registered on this module's own group object, so `python -m effc.cli` (a second module copy) gets them too.
from effc.cli_codegen import COMMANDS as _CODEGEN_COMMANDS  # noqa: E402  (run, bench)
for _command in _CODEGEN_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    code = run()
    if code == 130:
        # Interrupted: exit now, with 130. A Ctrl-C that landed inside an extension module's own Python
        # code (pybind11 runs some at import) makes CPython kill itself with SIGINT at exit instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` and return the exit code: 0, 2 (bad input, one line),
    1 (effc's own fault, one line) or 130 (interrupted); never a traceback unless EFFC_DEBUG=1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = bool(os.environ.get("EFFC_DEBUG"))
    try:
        code = cli.main(args=argv, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except EffcError as exc:
        _error(str(exc))
        return 2
    except EffcFault as exc:
        _error(str(exc))
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt):
        _error("aborted", prefix="effc: ")
        return 130
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except OSError as exc:  # the user's file system said no: full disk, no permission, read-only, ...
        if debug:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _error(f"{exc.strerror or type(exc).__name__}{where}")
        return 2
    except MemoryError:
        if debug:
            raise
        _error("out of memory (the model's tensors do not fit; see --max-memory)")
        return 2
    except Exception as exc:  # never a traceback for the user; EFFC_DEBUG=1 shows it
        if debug:
            raise
        text = str(exc).strip().splitlines()
        _error(f"{type(exc).__name__}: {text[0][:300] if text else ''} (set EFFC_DEBUG=1 for the traceback)",
               prefix="effc: internal error: ")
        return 1


def _error(text: str, prefix: str = "effc: error: ") -> None:
    line = " ".join(text.split())  # one line, whatever the message held
    click.echo(f"{prefix}{line}", err=True)


if __name__ == "__main__":
    main()
