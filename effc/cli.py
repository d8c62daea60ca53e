"""effc command line: compile, inspect, diff, passes, eval, zoo."""

from __future__ import annotations

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
@click.option("--opset", type=int, default=None, help="Convert the model to this opset first.")
@click.option("--inputs", "inputs", type=click.Path(exists=True, dir_okay=False), default=None,
              help=".npz of inputs used to measure each pass (default: seeded random inputs).")
@click.option("--keep-intermediate", is_flag=True, help="Also write the model after every pass.")
@click.option("--no-untie", is_flag=True, help="layernorm-to-rmsnorm: refuse rather than untie shared weights.")
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default=None,
              help="Also build OUT/model.so (+ params) with TVM for this target.")
@click.option("--arch", default=None, help="CUDA arch for --target cuda: sm_80, sm_90, ...")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the built module against ONNX Runtime on the exported model; beyond 1e-4 (scale-relative) "
              "exit 1 naming the first wrong kernel, leaving no module behind.")
@click.option("--records", "records", default="shipped", show_default=True,
              help="Tuning records for --target llvm: a file from `effc tune`, `shipped` (effc's records "
              "for this CPU family, when it has some) or `none` (the rules' built-in knobs).")
@click.option("--calib", "calib", default=None, help="Calibration inputs for lossy passes: an .npz "
              "(one array per input, first axis = samples) or zoo:NAME (that model's calibration set).")
@click.option("--bits", type=click.IntRange(2, 4), default=None, help="shift-add: bit planes per weight (default 3).")
@click.option("--group", type=click.IntRange(1), default=None, help="shift-add: input columns per scale (default 8).")
@click.option("--layers", default=None, help="shift-add: glob on node names of the linears to rewrite.")
@click.option("--avg-bits", "avg_bits", type=float, default=None, help="shift-add: allocate bits per layer under this average.")
def compile_cmd(model: str, out: str, passes: str | None, opset: int | None, inputs: str | None,
                keep_intermediate: bool, no_untie: bool, target: str | None, arch: str | None, calib: str | None,
                bits: int | None, group: int | None, layers: str | None, avg_bits: float | None,
                records: str | None, verify: bool) -> None:
    """Run passes on MODEL (.onnx, .pt2 or zoo:NAME); write OUT/model.onnx and OUT/report.json."""
    from effc.ir import save
    from effc.passes import parse_pass_list
    from effc.pipeline import run_pipeline
    from effc.report import render_table, write_report

    pass_list = parse_pass_list(passes)  # validate names before any expensive work
    if target:
        from effc.codegen.target import check_target_args

        check_target_args(target, arch)
    if records not in ("shipped", "none") and not Path(records).is_file():
        raise EffcError(f"--records: no such file '{records}' (or say `shipped` or `none`)")
    console = _console()
    with console.status(f"loading {model}"):
        ir_model, zoo_name = _load_model(model, opset)
    feeds = _read_feeds(inputs) if inputs else pass_feeds(zoo_name)
    calibration = None
    if calib:
        from effc.calib import load_npz, zoo_calibration

        calibration = zoo_calibration(calib[4:]) if calib.startswith("zoo:") else load_npz(calib)
    options = {"untie": not no_untie, "bits": bits, "group": group, "layers": layers, "avg_bits": avg_bits}
    with console.status("running passes") as status:
        result = run_pipeline(ir_model, pass_list, feeds=feeds, options=options, calibration=calibration,
                              keep_intermediate=keep_intermediate,
                              progress=lambda name: status.update(f"pass {name}"))
    out_dir = Path(out)
    save(result.model, out_dir / "model.onnx")
    if keep_intermediate:
        applied = [r for r in result.records if r.status == "applied"]
        for i, (rec, m) in enumerate(zip(applied, result.intermediates), 1):
            save(m, out_dir / "intermediate" / f"{i:02d}-{rec.name}.onnx")
    write_report(out_dir / "report.json", model, result.records)
    from effc.report import load_report

    console.print(render_table(load_report(out_dir / "report.json")))
    console.print(f"wrote {out_dir / 'model.onnx'} and {out_dir / 'report.json'}")
    if target:
        from effc.codegen.build import compile_model

        with console.status(f"building for {target}"):
            built = compile_model(result.model, target, out_dir, arch=arch, records=records, source=model)
        console.print(f"wrote {out_dir / 'model.so'} for {target} in {built.seconds:.0f} s")
        if built.custom_summary:
            console.print(built.custom_summary)
        _print_rule_problems(console, built)
        if verify:
            _verify_build(console, out_dir, result.model, feeds, target, arch, records)
        else:
            console.print("not verified against ONNX Runtime (--no-verify)")


def _print_rule_problems(console, built) -> None:
    """One line per schedule rule that failed on a kernel, and per kernel left to the generic rules."""
    for error in built.rule_errors:
        console.print(f"rule error: {error}")
    for kernel, rule in sorted(built.kernels.items()):
        if rule in ("fallback", "unscheduled"):
            console.print(f"kernel {kernel} is on the {rule} rule (no specific rule took it)")


def _verify_build(console, out_dir: Path, model, feeds, target: str, arch: str | None, records: str) -> None:
    """The built module against ONNX Runtime; a disagreement removes the module and exits 1."""
    from effc.codegen.build import discard_module
    from effc.codegen.check import verify_build
    from effc.codegen.target import gpu_present, make_target
    from effc.errors import EffcFault
    from effc.verify import make_inputs

    bt = make_target(target, arch)
    if bt.kind == "cuda" and not gpu_present():
        console.print("not verified against ONNX Runtime: no GPU here (`effc run` on a GPU machine can check it)")
        return
    feeds = feeds or make_inputs(model, 2, seed=0)
    try:
        with console.status("verifying against ONNX Runtime"):
            dev = verify_build(out_dir, model, feeds, bt, records)
    except EffcFault:
        if not os.environ.get("EFFC_DEBUG"):
            discard_module(out_dir)
        raise
    console.print(f"verified against ONNX Runtime on {len(feeds)} input(s): max rel err {dev.max_rel:.1e}")


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
            console.print(f"  [{p['name']}] {render_rewrite(rewrite)}")
        for skip in p.get("skipped", []):
            console.print(f"  [{p['name']}] skipped {skip['node']}: {skip['reason']}")
        if p.get("note"):
            console.print(f"  [{p['name']}] note: {p['note']}")


@cli.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
def diff_cmd(a: str, b: str) -> None:
    """Op-level differences between two ONNX models."""
    from effc.diff import diff_models, render_diff
    from effc.frontend.onnx import load

    click.echo(render_diff(diff_models(load(a), load(b))))


@cli.command("passes")
def passes_cmd() -> None:
    """List the available passes."""
    from effc.passes import REGISTRY

    for name, p in sorted(REGISTRY.items()):
        kind = "exact" if p.exact else "lossy"
        click.echo(f"{name:24s} {kind:6s} {p.summary}")


@cli.command("eval")
@click.argument("model", type=click.Path())
@click.option("--zoo", "zoo_name", required=True, help="Zoo model whose held-out data and metric to use.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write {metric, value}.")
def eval_cmd(model: str, zoo_name: str, json_path: str | None) -> None:
    """Compute a zoo model's task metric for MODEL (original or optimized)."""
    import json

    from effc import zoo
    from effc.frontend.onnx import load
    from effc.ir import atomic_write_text
    from effc.verify import OrtRunner

    module = zoo.get(zoo_name)
    runner = OrtRunner(load(model))
    with _console().status(f"evaluating {model} on {zoo_name}"):
        metric, value = module.evaluate(runner)
    click.echo(f"{metric}: {value:.6g}")
    if json_path:
        atomic_write_text(Path(json_path), json.dumps({"metric": metric, "value": value, "zoo": zoo_name}) + "\n")


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
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
def zoo_build(name: str, out: str) -> None:
    """Build zoo model NAME deterministically into OUT."""
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
    """Write zoo model NAME's calibration set (from its training split) to OUT (.npz)."""
    from effc.calib import save_npz, zoo_calibration

    feeds = zoo_calibration(name, count, seed)
    click.echo(f"wrote {save_npz(feeds, out)} ({len(feeds)} samples)")


# Registered on this module's own group object, so `python -m effc.cli` (a second module copy) gets them too.
from effc.cli_codegen import COMMANDS as _CODEGEN_COMMANDS  # noqa: E402  (run, bench)
for _command in _CODEGEN_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(standalone_mode=False)
    except EffcError as exc:
        click.echo(f"effc: error: {exc}", err=True)
        sys.exit(2)
    except EffcFault as exc:
        click.echo(f"effc: error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("effc: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"effc: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # never a traceback for the user; EFFC_DEBUG=1 shows it
        if os.environ.get("EFFC_DEBUG"):
            raise
        click.echo(f"effc: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(set EFFC_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
