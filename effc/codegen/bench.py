"""Latency of a compiled OUT directory against ONNX Runtime, torch eager and OpenVINO, measured interleaved.

Engines take turns within every round (in an order shuffled per round), so a slow phase of a shared machine
hits them alike; the first rounds are warm-up and dropped; median and p90 are over the rest.
Fairness between engines in one process: each engine's worker threads spin for a while after a
call (ONNX Runtime's until its next Run, TVM's and OpenMP's for a bounded count), and a spinning
pool steals cores from whichever engine runs next (>10x on small kernels). So ONNX Runtime sessions
stop spinning when Run returns (session.force_spinning_stop: spinning inside a Run is untouched),
and every turn starts after a short idle gap (not timed) in which the others' spinners go to sleep.

A turn is one call straight after that gap, then ``burst`` calls back to back. The back-to-back
calls give the headline (steady-state) latency, as a server under load or a latency benchmark run
in a loop sees it; the first call is reported apart as "after idle": on this shared VM a core that
idled for 150 ms comes back slow for tens of ms, and a kernel whose parallel loop is split evenly
(TVM's) waits for the slow core where ONNX Runtime's work stealing does not.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from effc.errors import EffcError

ENGINES = ("ort", "torch", "openvino")  # openvino: two engines, f32 and OpenVINO's default precision
# Idle before each timed call: after a call TVM's pool workers spin (yielding) for ~90 ms of CPU
# (measured with getrusage over the idle time, 2 threads), which made torch's OpenMP team 10x slower.
SETTLE_S = 0.15
BURST = 3  # back-to-back calls after the first of each turn
ORT_CONFIG = {"session.force_spinning_stop": "1"}


def _stats(times: list[float]) -> dict:
    ms = np.asarray(times) * 1e3
    return {"median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "runs": len(ms)}


def _original_model(out: Path, manifest: dict | None = None):
    """(path, zoo name) of the model `effc compile` started from, when the manifest (or, for older
    outputs, report.json) names one that can still be loaded."""
    import json

    spec = (manifest or {}).get("source")
    report = out / "report.json"
    if not spec and report.exists():
        spec = json.loads(report.read_text()).get("model")
    if not spec:
        return None, None
    if spec.startswith("zoo:"):
        from effc.zoo.cache import cached_model_path

        return cached_model_path(spec[4:]), spec[4:]
    return (Path(spec), None) if Path(spec).exists() else (None, None)


def bench(out_dir: str | Path, vs: tuple[str, ...] = ("ort",), feeds: list[dict] | None = None,
          warmup: int = 3, runs: int = 15, threads: int | None = None, settle_s: float = SETTLE_S,
          burst: int = BURST, progress=None) -> dict:
    """Benchmark OUT against the engines in ``vs``; returns the `effc bench --json` dictionary.
    ``progress(text)``, when given, hears what is being done (loading, round i of n)."""
    from effc.codegen.runtime import configure_threads, load_compiled
    from effc.codegen.target import host_threads
    from effc.verify import OrtRunner, deviation

    out = Path(out_dir)
    compiled = load_compiled(out, threads)
    # a CUDA build records 1 host thread; ONNX Runtime and torch on the CPU get the host's cores
    nthreads = configure_threads(threads or (host_threads() if compiled.is_cuda else compiled.manifest.get("threads"))
                                 or 1)
    unknown = set(vs) - set(ENGINES)
    if unknown:
        raise EffcError(f"--vs: unknown engine(s) {', '.join(sorted(unknown))} (known: {', '.join(ENGINES)})")
    if "openvino" in vs:
        from effc.codegen.openvino_engine import import_openvino

        import_openvino()  # missing: one line, before any model is loaded
    optimized = out / "model.onnx"
    original, zoo_name = _original_model(out, compiled.manifest)
    if "torch" in vs and zoo_name is None:
        raise EffcError(f"{out}: --vs torch needs a model compiled from zoo:NAME (only zoo models know "
                        "their torch module)")
    if feeds is None:
        feeds = default_feeds(out)
    feed = feeds[0]
    engines = {"effc": _effc_runner(compiled, feed)}
    sessions = {}
    if "ort" in vs:
        if not optimized.exists():
            raise EffcError(f"{out}: no model.onnx for the ONNX Runtime comparison")
        sessions["ort_optimized"] = OrtRunner(optimized, threads=nthreads, config=ORT_CONFIG)
        if original is not None and original.resolve() != optimized.resolve():
            sessions["ort"] = OrtRunner(original, threads=nthreads, config=ORT_CONFIG)
        else:
            sessions["ort"] = sessions.pop("ort_optimized")
        for name, sess in sessions.items():
            engines[name] = (lambda s: lambda: s(feed))(sess)
    if "torch" in vs:
        from effc.codegen.torch_engine import TorchEngine

        engines["torch"] = TorchEngine(zoo_name, [s["name"] for s in compiled.inputs], feed, nthreads,
                                       "cuda" if compiled.is_cuda else "cpu")
    openvino = _openvino_engines(original or optimized, feed, nthreads) if "openvino" in vs else {}
    engines.update(openvino)
    steady, after_idle = turns(engines, warmup + runs, warmup, settle_s, burst, progress=progress)
    result = {}
    for name in engines:
        result[name] = _stats(steady[name] or after_idle[name])
        idle = _stats(after_idle[name])
        result[name].update(after_idle_median_ms=idle["median_ms"], after_idle_p90_ms=idle["p90_ms"])
    result["threads"] = nthreads
    result["method"] = {"interleaved": True, "warmup": warmup, "settle_ms": round(settle_s * 1e3, 1),
                        "burst": burst, "ort_config": ORT_CONFIG}
    if "ort" in result:
        result["ratio_vs_ort"] = round(result["effc"]["median_ms"] / result["ort"]["median_ms"], 3)
        result["ratio_vs_ort_after_idle"] = round(
            result["effc"]["after_idle_median_ms"] / result["ort"]["after_idle_median_ms"], 3)
        # Agreement with ONNX Runtime on the very model that was compiled (codegen correctness);
        # a lossy pass's error is the compile report's business, not the code generator's.
        reference = sessions.get("ort_optimized", sessions["ort"])
        got = [compiled(f) for f in feeds]
        dev = deviation(got, reference.run_all(feeds))
        result["max_rel_err"], result["cosine_vs_ort"] = dev.max_rel, dev.cosine
        result["precision"] = compiled.manifest.get("precision", "fp32")  # bf16: judged at its tolerance
    if "torch" in result:
        result["ratio_vs_torch"] = round(result["effc"]["median_ms"] / result["torch"]["median_ms"], 3)
        first = compiled.output_names[0]
        result["torch_max_rel_err"] = deviation([{first: compiled(feed)[first]}],
                                                [{first: engines["torch"].output()}]).max_rel
    if openvino:
        # OpenVINO against ONNX Runtime on the model it ran: at f32 a codegen check like effc's,
        # at its default precision the rounding a user of it gets.
        reference = sessions.get("ort") or OrtRunner(original or optimized, threads=nthreads, config=ORT_CONFIG)
        reference = reference.run_all(feeds)
        for name, engine in openvino.items():
            result[name]["precision"] = engine.precision
            result[f"ratio_vs_{name}"] = round(result["effc"]["median_ms"] / result[name]["median_ms"], 3)
            result[f"{name}_max_rel_err"] = deviation([engine.run(f) for f in feeds], reference).max_rel
    return result


def _openvino_engines(model: Path, feed: dict, threads: int) -> dict:
    """The OpenVINO engines of `--vs openvino` on ``model``: f32 and OpenVINO's default precision."""
    from effc.codegen.openvino_engine import VARIANTS, OpenVinoEngine

    if not Path(model).exists():
        raise EffcError(f"{model}: no ONNX model for the OpenVINO comparison")
    return {name: OpenVinoEngine(model, feed, threads, precision) for name, precision in VARIANTS.items()}


def _wall_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def turns(engines: dict, rounds: int, warmup: int = 0, settle_s: float = SETTLE_S, burst: int = BURST,
          measure=_wall_seconds, progress=None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The interleaved timing loop: each round, each engine in turn idles ``settle_s``, is measured
    once (after idle), then ``burst`` times back to back (steady); the first ``warmup`` rounds are
    dropped. ``measure(fn)`` gives one sample (default: wall-clock seconds of ``fn()``).
    The engines' order changes every round (``round_order``).
    Returns (steady, after_idle) samples per engine."""
    steady: dict[str, list[float]] = {name: [] for name in engines}
    after_idle: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for round_ in range(rounds):
        if progress:
            progress(f"{'warm-up' if round_ < warmup else 'timed'} round {round_ + 1}/{rounds}")
        for name in round_order(names, round_):
            fn = engines[name]
            time.sleep(settle_s)
            for call in range(1 + burst):
                sample = measure(fn)
                if round_ >= warmup:
                    (after_idle if call == 0 else steady)[name].append(sample)
    return steady, after_idle


def round_order(names: list[str], round_: int) -> list[str]:
    """``names`` in a shuffled order, the same for the same round (seeded by it), so that over the
    rounds every engine follows a mix of the others. An engine can slow the one after it beyond
    the idle gap (measured on vit-s16, 2 threads: effc's CPU time per call 158 ms straight after
    OpenVINO with its default thread pinning, 94 ms after ONNX Runtime); a fixed order (or a
    rotation, which keeps each engine's predecessor) charged that to the same engine every round."""
    import random

    order = list(names)
    random.Random(round_).shuffle(order)
    return order


def default_feeds(out: Path) -> list[dict]:
    """The zoo model's sample inputs, or seeded random inputs for OUT/model.onnx."""
    from effc.frontend.onnx import load
    from effc.verify import make_inputs

    _, zoo_name = _original_model(out, _manifest(out))
    if zoo_name:
        from effc import zoo

        return zoo.get(zoo_name).sample_inputs(1, 0)
    if (out / "model.onnx").exists():
        return make_inputs(load(out / "model.onnx"), 1)
    raise EffcError(f"{out}: no model.onnx to derive inputs from; pass --inputs")


def _effc_runner(compiled, feed):
    """A zero-argument call of the compiled main with device inputs prepared once (as ORT's are)."""
    args = compiled.args(feed)
    main = compiled.vm["main"]
    params = compiled.params

    def run():
        result = main(*args, *params)
        if compiled.is_cuda:
            compiled.device.sync()
        return result

    return run


def _manifest(out: Path) -> dict | None:
    import json

    from effc.codegen.runtime import MANIFEST

    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
