"""Acceptance table of issue 4: task metrics at 2/3/4 bits for shift-add and its two baselines.

    python tools/shift_add_accuracy.py [--models gpt-text,minilm-l6,vit-digits] [-o table.md] [--threads 1]

Methods, all on the same layers (the shift-add pass's selection) with the same calibration:
- shift-add: the pass (power-of-two BCQ, group 8, GPTQ-compensated), run in ONNX Runtime through
  the effc.ShiftAddMatMul function;
- rtn-bcq: the same layout and storage, every weight rounded independently (no compensation);
- gptq-uniform: GPTQ with asymmetric uniform q-bit codes, one fp16 scale + q-bit zero per row
  and group of 8 inputs (dense fake-quantized weights; no shift-add kernel exists for it).
Storage counts planes and scales (bias excluded): bits/weight in the table.
Calibration activations are captured once per model and shared by all rows (the zoo's default
set unless --calib-count: 64 samples, vit-digits' from its validation images and gpt-text's from its
validation windows; for minilm-l6 its 238 calibration sentences).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from effc import zoo
from effc.calib import gram_matrices, single_threaded_blas, zoo_calibration
from effc.frontend.onnx import load
from effc.ir import copy_model, replace_input
from effc.passes._gptq import gptq
from effc.passes._uniform import UniformQuantizer
from effc.passes.base import PassOutcome
from effc.passes.shift_add import Options, ShiftAdd, rewrite_linears
from effc.verify import OrtRunner
from effc.zoo.cache import cached_model_path

MODELS = ("gpt-text", "minilm-l6", "vit-digits")
METHODS = ("shift-add", "rtn-bcq", "gptq-uniform")
BITS = (2, 3, 4)


def quantized_model(base, hessians, method: str, bits: int, group: int):
    """A copy of ``base`` with the selected linears quantized by ``method``; (model, bits/weight)."""
    model = copy_model(base)
    opts = Options(bits=bits, group=group, compensate=method != "rtn-bcq")
    selected = ShiftAdd.select(model, opts, PassOutcome())
    size = sum(lin.weight.size for lin in selected)
    if method != "gptq-uniform":
        rewrites, _ = rewrite_linears(model, selected, hessians, {lin.name: bits for lin in selected}, opts)
        stored = sum(r.details["bits_per_weight"] * lin.weight.size for r, lin in zip(rewrites, selected))
        return model, stored / size
    bits_per_weight = 0.0
    for lin in selected:
        quantizer = UniformQuantizer(*lin.weight.shape, bits, group)
        with single_threaded_blas():
            dense = gptq(lin.weight, hessians[lin.x.name], quantizer, group).astype(np.float32)
        node = lin.node
        if node.op_type == "MatMul":
            replace_input(node, 1, dense.T, f"{lin.name}_uniform")
        else:  # Gemm: W = alpha * B (transposed unless transB)
            weight = dense / node.attributes.get_float("alpha", 1.0)
            replace_input(node, 1, weight if node.attributes.get_int("transB", 0) else weight.T, f"{lin.name}_uniform")
        bits_per_weight += quantizer.bits_per_weight() * lin.weight.size
    return model, bits_per_weight / size


def table_for(name: str, count: int | None, group: int, log, threads: int = 0) -> list[str]:
    module = zoo.get(name)
    base = load(cached_model_path(name))
    metric, fp32 = module.evaluate(OrtRunner(base, threads=threads))
    start = time.perf_counter()
    selected = ShiftAdd.select(base, Options(), PassOutcome())
    grams = gram_matrices(base, zoo_calibration(name, count), [lin.x.name for lin in selected])
    hessians = {key: g.hessian() for key, g in grams.items()}
    log(f"{name}: fp32 {metric} {fp32:.4f}; {len(selected)} linears, calibration {time.perf_counter() - start:.0f} s")
    rows = []
    for bits in BITS:
        for method in METHODS:
            start = time.perf_counter()
            model, bpw = quantized_model(base, hessians, method, bits, group)
            seconds = time.perf_counter() - start
            _, value = module.evaluate(OrtRunner(model, threads=threads))
            rows.append(f"| {name} | {metric} | {fp32:.4f} | {bits} | {method} | {bpw:.2f} | {value:.4f} | "
                        f"{value / fp32:.3f} |")
            log(f"  {bits} bits {method:12s} {bpw:.2f} b/w  {metric} {value:.4f}  (quantized in {seconds:.0f} s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--calib-count", type=int, default=None,
                        help="calibration samples per model (default: the zoo's default set)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("-o", "--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    lines = ["| model | metric | fp32 | bits | method | bits/weight | value | value / fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        lines += table_for(name.strip(), args.calib_count, args.group, log, args.threads)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
