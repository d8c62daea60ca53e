"""`effc run`, `effc bench` and `effc tune`: execute, time and tune `effc compile --target` outputs.

The commands are standalone; effc/cli.py adds COMMANDS to its group (importing effc.cli from here
would attach them to a second copy of the group when effc runs as `python -m effc.cli`)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from effc.errors import EffcError


def _feeds_for(compiled, path: str) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz. An array shaped like the compiled input is one sample; otherwise its
    first axis counts samples: concatenated on the compiled batch-1 axis ([N, ...] for [1, ...]),
    or stacked for inputs without one ([N] for a 0-d input). A 0-d input given once goes with
    every sample; another input given whole only with a single sample."""
    try:
        data = np.load(path)
    except Exception as exc:
        raise EffcError(f"{path}: not an .npz of inputs ({exc})") from None
    layouts, counts = {}, set()
    for spec in compiled.inputs:
        name, want = spec["name"], list(spec["shape"])
        if name not in data.files:
            raise EffcError(f"{path}: no array for input '{name}' (has: {', '.join(data.files)})")
        shape = list(data[name].shape)
        if shape == want:
            layouts[name] = "shared" if not want else "whole"
        elif want and want[0] == 1 and len(shape) == len(want) and shape[1:] == want[1:]:
            layouts[name], count = "concatenated", shape[0]
        elif shape[1:] == want and len(shape) == len(want) + 1:
            layouts[name], count = "stacked", shape[0]
        else:
            raise EffcError(f"{path}: input '{name}' has shape {shape}, compiled for {want}")
        if layouts[name] not in ("shared", "whole"):
            counts.add(count)
    if not counts:
        return [{s["name"]: data[s["name"]] for s in compiled.inputs}]
    count = counts.pop()
    if counts or ("whole" in layouts.values() and count != 1):
        raise EffcError(f"{path}: inputs disagree on the number of samples")
    take = {"shared": lambda a, i: a, "whole": lambda a, i: a, "concatenated": lambda a, i: a[i:i + 1],
            "stacked": lambda a, i: np.asarray(a[i])}  # a 0-d array, not a numpy scalar
    return [{s["name"]: take[layouts[s["name"]]](data[s["name"]], i) for s in compiled.inputs} for i in range(count)]


def _merge(results: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """One array per output: a single sample as is; samples concatenated on a leading batch axis
    of 1, else stacked on a new axis 0 (0-d outputs, outputs of a model compiled for batch > 1)."""
    if len(results) == 1:
        return {name: results[0][name] for name in names}
    merged = {}
    for name in names:
        arrays = [r[name] for r in results]
        merged[name] = np.concatenate(arrays) if arrays[0].ndim and arrays[0].shape[0] == 1 else np.stack(arrays)
    return merged


@click.command("run")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--inputs", "inputs", required=True, type=click.Path(exists=True, dir_okay=False),
              help=".npz with one array per model input, shaped as compiled, or with a first axis of samples "
                   "(the batch-1 axis, or a new one); a 0-d input given once is shared by all samples.")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: as compiled; TVM_NUM_THREADS wins).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Also run OUT/model.onnx in ONNX Runtime on the same inputs; exit 1 (outputs still written) "
              "when the module disagrees beyond 1e-4 scale-relative (a bf16 module: beyond its bf16 bounds).")
def run_cmd(out: str, inputs: str, output: str, threads: int | None, check: bool) -> None:
    """Run the compiled module in OUT on INPUTS and write its outputs to an .npz."""
    from effc.codegen.runtime import load_compiled

    compiled = load_compiled(out, threads)
    feeds = _feeds_for(compiled, inputs)
    results = [compiled(f) for f in feeds]
    merged = _merge(results, compiled.output_names)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as handle:  # np.savez would append .npz to a name without it
        np.savez(handle, **merged)
    click.echo(f"wrote {output} ({len(feeds)} sample{'s' if len(feeds) != 1 else ''})")
    if check:
        from effc.verify import OrtRunner, deviation

        dev = deviation(results, OrtRunner(Path(out) / "model.onnx").run_all(feeds))
        precision = compiled.manifest.get("precision", "fp32")
        _fail_on_disagreement(dev.max_rel, dev.cosine, precision,
                              _tolerance(Path(out) / "model.onnx", feeds, dev.max_rel, precision))


def _tolerance(model_path: Path, feeds: list[dict], max_rel: float, precision: str = "fp32") -> float:
    """TOLERANCE, or for a quantized model beyond it (a bf16 module: beyond the bf16 bound), ONNX
    Runtime's own rounding and the graph's flip sensitivity (qdq_tolerance; bf16: to bf16's rounding)."""
    from effc.codegen.check import TOLERANCE
    from effc.codegen.precision import float_bound

    if max_rel <= float_bound(precision, TOLERANCE):
        return TOLERANCE
    import onnx_ir as ir

    from effc.codegen.qdq_tolerance import flip_eps, tolerance_for

    return tolerance_for(ir.load(str(model_path)), feeds, TOLERANCE, flip_eps(precision))


def _fail_on_disagreement(max_rel: float, cosine: float = 1.0, precision: str = "fp32",
                          tolerance: float | None = None) -> None:
    """EffcFault (exit 1) when the compiled module is further than ``tolerance`` (TOLERANCE; a quantized
    model: ONNX Runtime's own rounding) from ONNX Runtime (a bf16 module: beyond effc.codegen.precision's
    bf16 bounds)."""
    from types import SimpleNamespace

    from effc.codegen.check import TOLERANCE
    from effc.codegen.precision import within_tolerance
    from effc.errors import EffcFault

    tolerance = TOLERANCE if tolerance is None else tolerance
    if not within_tolerance(precision, SimpleNamespace(max_rel=max_rel, cosine=cosine), tolerance):
        bound = f"bf16 bounds, cosine {cosine:.6f}" if precision == "bf16" else f"{tolerance:g}"
        raise EffcFault(f"the compiled module disagrees with ONNX Runtime on its own model.onnx (max rel err "
                        f"{max_rel:.2e}, beyond {bound}): its results are wrong; please report it with the model")


@click.command("bench")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--vs", "vs", default="ort", show_default=True,
              help="Comma-separated engines to compare with: ort, torch (zoo models only), openvino "
                   "(OpenVINO at f32 and at its default precision; the `bench` extra).")
@click.option("--inputs", "inputs", type=click.Path(exists=True, dir_okay=False), default=None,
              help=".npz of inputs (default: the zoo model's samples or seeded random inputs).")
@click.option("--runs", type=int, default=15, show_default=True, help="Timed rounds after warm-up.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed rounds first.")
@click.option("--threads", type=int, default=None, help="Threads for every engine (default: as compiled).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results.")
@click.option("--profile", "profile", is_flag=True, help="Also list the slowest kernels and their share of time.")
@click.option("--top", type=int, default=15, show_default=True, help="Kernels listed by --profile.")
def bench_cmd(out: str, vs: str, inputs: str | None, runs: int, warmup: int, threads: int | None,
              json_path: str | None, profile: bool, top: int) -> None:
    """Latency of OUT's compiled module against ONNX Runtime, torch eager and OpenVINO (interleaved turns, each
    an idle gap, then one call reported as "after idle" and 3 back-to-back calls giving the median
    and p90; ONNX Runtime not spinning between runs)."""
    from effc.codegen.bench import bench
    from effc.codegen.runtime import load_compiled
    from effc.ir import atomic_write_text

    if runs < 1 or warmup < 0:
        raise EffcError("--runs must be >= 1 and --warmup >= 0")
    feeds = _feeds_for(load_compiled(out, threads), inputs) if inputs else None
    engines = tuple(e.strip() for e in vs.split(",") if e.strip())
    from effc.cli import _console

    with _console().status(f"benchmarking {out}") as status:  # a zoo model takes minutes: say where it is
        result = bench(out, engines, feeds=feeds, warmup=warmup, runs=runs, threads=threads,
                       progress=lambda text: status.update(f"benchmarking {out}: {text}"))
    for name, stats in result.items():
        if isinstance(stats, dict) and "median_ms" in stats:  # an engine (not "method")
            precision = f"   ({stats['precision']})" if "precision" in stats else ""
            click.echo(f"{name:14s} median {stats['median_ms']:9.3f} ms   p90 {stats['p90_ms']:9.3f} ms   "
                       f"after idle {stats['after_idle_median_ms']:9.3f} ms{precision}")
    if "ratio_vs_ort" in result:
        click.echo(f"effc / ort: {result['ratio_vs_ort']:.3f} (after idle {result['ratio_vs_ort_after_idle']:.3f})"
                   f"   max rel err vs ort: {result['max_rel_err']:.2e}   cosine {result['cosine_vs_ort']:.6f}"
                   f"   (effc precision {result['precision']})")
    if "ratio_vs_torch" in result:
        click.echo(f"effc / torch: {result['ratio_vs_torch']:.3f}   max rel err vs torch: "
                   f"{result['torch_max_rel_err']:.2e}")
    for name in ("openvino-f32", "openvino"):
        if f"ratio_vs_{name}" in result:
            click.echo(f"effc / {name} ({result[name]['precision']}): {result[f'ratio_vs_{name}']:.3f}   "
                       f"{name} max rel err vs ort: {result[f'{name}_max_rel_err']:.2e}")
    if profile:
        from effc.codegen import profile as prof

        compiled = load_compiled(out, threads)
        rows, wall_ms = prof.profile(compiled, (feeds or [_default_feed(out, compiled)])[0], runs=max(1, min(runs, 5)))
        click.echo("")
        click.echo(prof.table(rows, wall_ms, top))
        unscheduled = sorted({k for k, rule in compiled.manifest.get("kernels", {}).items() if rule == "unscheduled"})
        if unscheduled:
            click.echo(f"unscheduled kernels ({len(unscheduled)}): {', '.join(unscheduled)}")
        result["profile"] = [vars(r) for r in rows]
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(result, indent=2) + "\n")
    if "max_rel_err" in result:
        from effc.codegen.check import TOLERANCE

        max_rel = result["max_rel_err"]
        tolerance = TOLERANCE if max_rel <= TOLERANCE else _tolerance(
            Path(out) / "model.onnx", feeds or [_default_feed(out, load_compiled(out, threads))], max_rel,
            result["precision"])
        _fail_on_disagreement(max_rel, result["cosine_vs_ort"], result["precision"], tolerance)


@click.command("tune")
@click.argument("model")
@click.option("--target", type=click.Choice(["llvm"]), default="llvm", show_default=True,
              help="Tuning runs on this machine's CPU.")
@click.option("--trials", type=click.IntRange(1), default=8, show_default=True,
              help="Knob sets tried per distinct workload (the rule's default is always the first).")
@click.option("--records", "records", required=True, type=click.Path(dir_okay=False),
              help="Record file to extend (JSON; created if missing, resumed if present).")
@click.option("--passes", default=None,
              help="Passes run first, as `effc compile` runs them, so that the tuned kernels are the ones it "
                   "builds (default: its default passes, or the recipe's; none: MODEL as it is). Not for an OUT "
                   "directory, whose model.onnx has been through them.")
@click.option("--recipe", "recipe", type=click.Path(), default=None,
              help="Run the passes of this recipe (an OUT/recipe.json), with its options and calibration, first.")
def tune_cmd(model: str, target: str, trials: int, records: str, passes: str | None, recipe: str | None) -> None:
    """Search the CPU rules' knobs for each distinct kernel of MODEL and keep the best per kernel in
    RECORDS; `effc compile --records RECORDS` applies them. MODEL is what gets built: an `effc
    compile` OUT directory (its model.onnx, which its recipe.json's passes, options and calibration
    made: exactly the kernels of its build), an .onnx file, or zoo:NAME (with --recipe: as that compile)."""
    from effc.codegen.tune import tune_model

    if Path(model).is_dir():
        if passes is not None or recipe is not None:
            flag = "--passes" if passes is not None else "--recipe"
            raise EffcError(f"{flag}: {model} is an `effc compile` output, already through its passes "
                            "(those of its recipe.json)")
        ir_model = _compiled_model(Path(model))
    else:
        ir_model = _model_through_recipe(model, passes, recipe)
    made_by = model if Path(model, "recipe.json").is_file() else recipe
    from effc import recipe as recipes

    precision = recipes.load(made_by).precision if made_by else "fp32"  # tune what that compile built
    result = tune_model(ir_model, trials, records, progress=click.echo, precision=precision)
    click.echo(f"{result.workloads} workloads, {result.tuned} tuned now, {result.seconds} s; records in {records}")
    if Path(model).is_dir():
        click.echo(_compare_with_build(Path(model), result.kernels))


def _compiled_model(out: Path):
    """OUT/model.onnx, after saying which recipe made it."""
    from effc import recipe as recipes
    from effc.frontend.onnx import load

    if not (out / "model.onnx").is_file():
        raise EffcError(f"{out}: not an `effc compile` output (no model.onnx)")
    if (out / recipes.NAME).is_file():
        made = recipes.load(out)
        options = "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in _non_default(name, opts).items())}"
                            for name, opts in made.options.items() if _non_default(name, opts))
        click.echo(f"tuning {out / 'model.onnx'}: passes {','.join(made.passes) or 'none'}"
                   + (f" ({options})" if options else "") + (f", calibration {made.calib}" if made.calib else ""))
    return load(out / "model.onnx")


def _non_default(pass_name: str, options: dict) -> dict:
    from effc.passes import REGISTRY
    from effc.passes.options import specs

    defaults = {o.name: o.default for o in specs(REGISTRY[pass_name].Options)} if pass_name in REGISTRY else {}
    return {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}


def _model_through_recipe(model: str, passes: str | None, recipe: str | None):
    """MODEL after the passes `effc compile` would run on it: --passes, else the recipe's (with its
    options, calibration and measurement inputs), else the default passes."""
    from effc import recipe as recipes
    from effc.cli import _load_model, _read_feeds, load_calibration, parse_budget, pass_feeds
    from effc.passes import get_pass, parse_pass_list
    from effc.pipeline import run_pipeline

    made = recipes.load(recipe) if recipe else None
    if made is None or passes is not None:
        pass_list = parse_pass_list(passes)
    else:
        pass_list = [get_pass(name) for name in made.passes]
    options = {n: o for n, o in (made.options if made else {}).items() if n in {p.name for p in pass_list}}
    ir_model, zoo_name = _load_model(model, made.opset if made else None)
    if not pass_list:
        return ir_model
    calibration = load_calibration(made.calib) if made else None
    feeds = _read_feeds(made.inputs) if made and made.inputs else pass_feeds(zoo_name)
    if made:
        recipes.check_hash("calib", made.calib, calibration, made.calib_hash)
        recipes.check_hash("inputs", made.inputs, feeds if made.inputs else None, made.inputs_hash)
    budget = parse_budget(made.budget, model) if made and made.budget and calibration else None
    return run_pipeline(ir_model, pass_list, feeds=feeds, options=options, calibration=calibration,
                        budget=budget if any(p.budgeted for p in pass_list) else None).model


def _compare_with_build(out: Path, tuned: dict[str, str]) -> str:
    """One line: whether the kernels tuned are exactly the matmul-rule kernels of OUT's llvm build."""
    from effc.codegen.runtime import MANIFEST
    from effc.codegen.tune import TUNED_RULES

    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{out} has no llvm build ({MANIFEST}) to compare the tuned kernels with"
    if manifest.get("target") != "llvm":
        return f"{out} was built for {manifest.get('target')}: these records serve an llvm build of its model.onnx"
    built = {name for name, rule in manifest.get("kernels", {}).items() if rule in TUNED_RULES}
    if built == set(tuned):
        return f"tuned all {len(built)} matmul kernels of {out}'s build ({len(set(tuned.values()))} distinct workloads)"
    return (f"warning: the tuned kernels differ from {out}'s build: {len(built - set(tuned))} built but not tuned, "
            f"{len(set(tuned) - built)} tuned but not built (it was built by another effc version?)")


def _default_feed(out: str, compiled) -> dict:
    from effc.codegen.bench import default_feeds

    return default_feeds(Path(out))[0]


COMMANDS = [run_cmd, bench_cmd, tune_cmd]
