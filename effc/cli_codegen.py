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
    """Feeds from an .npz: an array shaped like the compiled input is one sample; otherwise its
    first axis counts samples of the compiled (batch-1) shape."""
    try:
        data = np.load(path)
    except Exception as exc:
        raise EffcError(f"{path}: not an .npz of inputs ({exc})") from None
    counts = set()
    for spec in compiled.inputs:
        if spec["name"] not in data.files:
            raise EffcError(f"{path}: no array for input '{spec['name']}' (has: {', '.join(data.files)})")
        shape = list(data[spec["name"]].shape)
        if shape == spec["shape"]:
            counts.add(None)
        elif len(shape) == len(spec["shape"]) and shape[1:] == spec["shape"][1:] and spec["shape"][0] == 1:
            counts.add(shape[0])
        else:
            raise EffcError(f"{path}: input '{spec['name']}' has shape {shape}, compiled for {spec['shape']}")
    if counts == {None}:
        return [{s["name"]: data[s["name"]] for s in compiled.inputs}]
    if len(counts) != 1 or None in counts:
        raise EffcError(f"{path}: inputs disagree on the number of samples")
    count = counts.pop()
    return [{s["name"]: data[s["name"]][i:i + 1] for s in compiled.inputs} for i in range(count)]


@click.command("run")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--inputs", "inputs", required=True, type=click.Path(exists=True, dir_okay=False),
              help=".npz with one array per model input (first axis = samples when the model takes batch 1).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: as compiled; TVM_NUM_THREADS wins).")
def run_cmd(out: str, inputs: str, output: str, threads: int | None) -> None:
    """Run the compiled module in OUT on INPUTS and write its outputs to an .npz."""
    from effc.codegen.runtime import load_compiled

    compiled = load_compiled(out, threads)
    feeds = _feeds_for(compiled, inputs)
    results = [compiled(f) for f in feeds]
    merged = {name: (results[0][name] if len(results) == 1 else np.concatenate([r[name] for r in results]))
              for name in compiled.output_names}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as handle:  # np.savez would append .npz to a name without it
        np.savez(handle, **merged)
    click.echo(f"wrote {output} ({len(feeds)} sample{'s' if len(feeds) != 1 else ''})")


@click.command("bench")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--vs", "vs", default="ort", show_default=True,
              help="Comma-separated engines to compare with: ort, torch (zoo models only).")
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
    """Latency of OUT's compiled module against ONNX Runtime and torch eager (interleaved turns, each
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
            click.echo(f"{name:14s} median {stats['median_ms']:9.3f} ms   p90 {stats['p90_ms']:9.3f} ms   "
                       f"after idle {stats['after_idle_median_ms']:9.3f} ms")
    if "ratio_vs_ort" in result:
        click.echo(f"effc / ort: {result['ratio_vs_ort']:.3f} (after idle {result['ratio_vs_ort_after_idle']:.3f})"
                   f"   max rel err vs ort: {result['max_rel_err']:.2e}")
    if "ratio_vs_torch" in result:
        click.echo(f"effc / torch: {result['ratio_vs_torch']:.3f}   max rel err vs torch: "
                   f"{result['torch_max_rel_err']:.2e}")
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
                   "builds (default: its default passes; none: MODEL as it is). Not for an OUT directory, "
                   "whose model.onnx has been through them.")
def tune_cmd(model: str, target: str, trials: int, records: str, passes: str | None) -> None:
    """Search the CPU rules' knobs for each distinct kernel of MODEL and keep the best per kernel in
    RECORDS; `effc compile --records RECORDS` applies them. MODEL is what gets built: an `effc
    compile` OUT directory (its optimized model.onnx), an .onnx file, or zoo:NAME."""
    from effc.cli import _load_model, pass_feeds
    from effc.codegen.tune import tune_model
    from effc.frontend.onnx import load
    from effc.passes import parse_pass_list
    from effc.pipeline import run_pipeline

    if Path(model).is_dir():
        if passes is not None:
            raise EffcError(f"--passes: {model} is an `effc compile` output, already through its passes")
        ir_model, pass_list = load(Path(model) / "model.onnx"), []
    else:
        pass_list = parse_pass_list(passes)
        ir_model, zoo_name = _load_model(model)
    if pass_list:
        ir_model = run_pipeline(ir_model, pass_list, feeds=pass_feeds(zoo_name)).model
    result = tune_model(ir_model, trials, records, progress=click.echo)
    click.echo(f"{result.workloads} workloads, {result.tuned} tuned now, {result.seconds} s; records in {records}")


def _default_feed(out: str, compiled) -> dict:
    from effc.codegen.bench import default_feeds

    return default_feeds(Path(out))[0]


COMMANDS = [run_cmd, bench_cmd, tune_cmd]
