"""Run the generality suite's cases (tests/generality) and print one table row per case: passes,
compile result, deviation from ONNX Runtime, kernels off a real rule, and latency against ONNX
Runtime (effc/codegen/bench.py, interleaved).

    PYTHONPATH=$PWD python tools/generality_sweep.py [--arch vit,bert] [--impl sdpa,eager,default]
                                                     [--batch 1,2] [--precision fp32,bf16,int8,int8-effc]
                                                     [--runs 15] [--no-bench] [--work DIR]

One table per precision (tests/generality/check.py says what each compares with and at what
tolerance): fp32 as above; bf16 (`--precision bf16` on the exported file, against ONNX Runtime
fp32), int8 (ONNX Runtime's quantize_static QDQ copy, against ONNX Runtime on it) and int8-effc
(the same on effc's quantize pass's QDQ copy) with their deviation, the bound it is held to, and
what fell off the bf16 / int8 kernels. A bf16 or int8 case takes 5-30 s on this 2-core machine.

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

from tests.generality.check import (EXPORT_REFUSED, PRECISIONS, all_cases, compile_case,  # noqa: E402
                                    export_case, off_low_precision_summary, off_rule_summary, pass_summary)

COLUMNS = ("arch", "impl", "batch", "fold-batchnorm", "layernorm-to-rmsnorm", "compile", "max_rel vs ORT",
           "off a real rule (op, rule)", "effc/ORT")
LOW_COLUMNS = {
    "bf16": ("arch", "impl", "batch", "compile", "max_rel vs ORT fp32 (bound)", "cosine",
             "off the bf16 rule (op, rule)", "off a real rule (op, rule)", "effc/ORT"),
    "int8": ("arch", "impl", "batch", "compile", "max_rel vs ORT on the QDQ file (bound)", "cosine",
             "ORT's own rounding (fused vs as written; flip sensitivity)", "max_rel vs the QDQ graph as written",
             "off the int8 kernels (op, where)", "off a real rule (op, rule)", "effc/ORT"),
}
LOW_COLUMNS["int8-effc"] = LOW_COLUMNS["int8"]


def _cell(text: str, width: int = 70) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def verdict(outcome) -> tuple[str, str]:
    """(compile cell, max_rel cell)."""
    if outcome.error:
        compiled, rel = f"refused: {outcome.error}", "-"
    else:
        compiled = "ok" if outcome.ok else "WRONG"
        rel = f"{outcome.max_rel:.2e}"
    if outcome.rule_errors:
        compiled += f" ({len(outcome.rule_errors)} rule errors)"
    return compiled, rel


def row(case, exported, outcome, ratio: str) -> list[str]:
    passes = {r.name: pass_summary(r) for r in outcome.records}
    compiled, rel = verdict(outcome)
    return [case.arch, case.impl, str(case.batch), _cell(passes.get("fold-batchnorm", "-")),
            _cell(passes.get("layernorm-to-rmsnorm", "-")), _cell(compiled, 60), rel,
            _cell(off_rule_summary(outcome) if not outcome.error else "-", 60), ratio]


def low_row(case, outcome, ratio: str) -> list[str]:
    """A bf16 or int8 row (LOW_COLUMNS)."""
    compiled, rel = verdict(outcome)
    if outcome.built_note:
        compiled += f" ({outcome.built_note})"
    built = outcome.error is None and outcome.max_rel is not None
    cells = [case.arch, case.impl, str(case.batch), _cell(compiled, 80),
             f"{rel} ({outcome.bound:.1e})" if built else "-", f"{outcome.cosine:.6f}" if built else "-"]
    if outcome.precision.startswith("int8"):
        cells += [f"{outcome.ort_rounding:.2e}; {outcome.flips:.2e}" if outcome.ort_rounding is not None else "-",
                  f"{outcome.vs_written:.2e}" if outcome.vs_written is not None else "-"]
    cells += [_cell(off_low_precision_summary(outcome), 90) if built else "-",
              _cell(off_rule_summary(outcome), 60) if built else "-", ratio]
    return cells


def table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(cells) + " |" for cells in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="comma-separated architectures (default: all)")
    parser.add_argument("--impl", default=None, help="comma-separated attention implementations")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes")
    parser.add_argument("--precision", default="fp32", help="comma-separated precisions: fp32, bf16, int8")
    parser.add_argument("--runs", type=int, default=15, help="timed rounds per benchmark")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    parser.add_argument("--work", default=None, help="directory for exports and builds (default: a temp dir)")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precision.split(",") if p]
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"--precision: unknown {', '.join(unknown)} (known: {', '.join(PRECISIONS)})")

    def chosen(value, allowed):
        return value is None or str(allowed) in value.split(",")

    cases = [c for c in all_cases() if chosen(args.arch, c.arch) and chosen(args.impl, c.impl)
             and chosen(args.batch, c.batch)]
    work = Path(args.work or tempfile.mkdtemp(prefix="effc-generality-"))
    print(f"# generality sweep: {len(cases)} cases x {', '.join(precisions)} in {work}", file=sys.stderr)
    rows: dict[str, list] = {p: [] for p in precisions}
    for case in cases:
        with contextlib.redirect_stdout(sys.stderr):
            exported = export_case(case, work / "onnx")
        for precision in precisions:
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # TVM's importer prints its errors: keep the table clean
                outcome = compile_case(exported, work / "build" / f"{case.id}-{precision}", precision)
            ratio = "-"
            if not args.no_bench and outcome.ok:
                from effc.codegen.bench import bench

                result = bench(outcome.out_dir, vs=("ort",), feeds=[exported.feed], runs=args.runs)
                ratio = f"{result['ratio_vs_ort']:.2f}"
            rows[precision].append(row(case, exported, outcome, ratio) if precision == "fp32"
                                   else low_row(case, outcome, ratio))
            print(f"# {case.id} {precision}: {time.perf_counter() - start:.1f} s; {rows[precision][-1][3:6]}",
                  file=sys.stderr, flush=True)
    for precision in precisions:
        print(f"\n{precision}\n")
        print("\n".join(table(COLUMNS if precision == "fp32" else LOW_COLUMNS[precision], rows[precision])))
        if precision == "fp32":
            for (arch, impl), reason in EXPORT_REFUSED.items():
                if chosen(args.arch, arch) and chosen(args.impl, impl):
                    print(f"| {arch} | {impl} | 1,2 | - | - | not exported: {_cell(reason, 200)} | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
