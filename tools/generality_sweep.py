"""Run the generality suite's cases (tests/generality) and print one table row per case: passes,
compile result, deviation from ONNX Runtime, kernels off a real rule, and latency against ONNX
Runtime (effc/codegen/bench.py, interleaved).

    PYTHONPATH=$PWD python tools/generality_sweep.py [--arch vit,bert] [--impl sdpa,eager,default]
                                                     [--batch 1,2] [--runs 15] [--no-bench] [--work DIR]

Heavy (a build and a benchmark per case): run it on an otherwise idle machine. The models are tiny
(0.05-0.5 ms a call), so the latency ratios are noisy on a shared machine; repeat before relying on one.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.generality from a checkout

from tests.generality.check import (EXPORT_REFUSED, TOLERANCE, all_cases, compile_case,  # noqa: E402
                                    export_case, off_rule_summary, pass_summary)

COLUMNS = ("arch", "impl", "batch", "fold-batchnorm", "layernorm-to-rmsnorm", "compile", "max_rel vs ORT",
           "off a real rule (op, rule)", "effc/ORT")


def _cell(text: str, width: int = 70) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def row(case, exported, outcome, ratio: str) -> list[str]:
    passes = {r.name: pass_summary(r) for r in outcome.records}
    if outcome.error:
        compiled, rel = f"refused: {outcome.error}", "-"
    else:
        compiled = "ok" if outcome.max_rel <= TOLERANCE else "WRONG"
        rel = f"{outcome.max_rel:.2e}"
    if outcome.rule_errors:
        compiled += f" ({len(outcome.rule_errors)} rule errors)"
    return [case.arch, case.impl, str(case.batch), _cell(passes.get("fold-batchnorm", "-")),
            _cell(passes.get("layernorm-to-rmsnorm", "-")), _cell(compiled, 60), rel,
            _cell(off_rule_summary(outcome) if not outcome.error else "-", 60), ratio]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="comma-separated architectures (default: all)")
    parser.add_argument("--impl", default=None, help="comma-separated attention implementations")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=15, help="timed rounds per benchmark")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    parser.add_argument("--work", default=None, help="directory for exports and builds (default: a temp dir)")
    args = parser.parse_args(argv)

    def chosen(value, allowed):
        return value is None or str(allowed) in value.split(",")

    cases = [c for c in all_cases() if chosen(args.arch, c.arch) and chosen(args.impl, c.impl)
             and chosen(args.batch, c.batch)]
    work = Path(args.work or tempfile.mkdtemp(prefix="effc-generality-"))
    print(f"# generality sweep: {len(cases)} cases in {work}", file=sys.stderr)
    rows = []
    for case in cases:
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # TVM's importer prints its errors: keep the table clean
            exported = export_case(case, work / "onnx")
            outcome = compile_case(exported, work / "build" / case.id)
        ratio = "-"
        if not args.no_bench and outcome.max_rel is not None and outcome.max_rel <= TOLERANCE:
            from effc.codegen.bench import bench

            result = bench(outcome.out_dir, vs=("ort",), feeds=[exported.feed], runs=args.runs)
            ratio = f"{result['ratio_vs_ort']:.2f}"
        rows.append(row(case, exported, outcome, ratio))
        print(f"# {case.id}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    for (arch, impl), reason in EXPORT_REFUSED.items():
        if chosen(args.arch, arch) and chosen(args.impl, impl):
            print(f"| {arch} | {impl} | 1,2 | - | - | not exported: {_cell(reason, 200)} | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
