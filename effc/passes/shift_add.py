"""shift-add: ShiftAddLLM's post-training multiplication-less linears (lossy).

Each selected MatMul/Gemm weight W [N, K] becomes q binary planes with power-of-two scales,
W ~= sum_i alpha_i b_i, one scale per plane, output row and group of ``group`` input columns,
emitted as ``effc.ShiftAddMatMul``. Scales come from alternating refinement (``_bcq``); codes
are chosen column by column with GPTQ's error compensation (``_gptq``) under H = 2 X^T X from
calibration activations, which is what keeps 3 and 2 bits usable. Without calibration data (or
with ``compensate=False``) every weight is rounded independently: the round-to-nearest baseline.

Options (ctx.options): bits (2/3/4, default 3), group (8), terms (powers of two per scale,
1-3, default 1), layers (glob on node names; selecting a protected layer includes it),
avg_bits (allocate 2-4 bits per layer under this average, by measured sensitivity),
act_order (False), compensate (True), damp (0.01), clip (True: compensated weights stay
within the largest magnitude of their original group; see ``_bcq.BCQQuantizer``), weighted
(True: each group's scales are fitted to the weight error weighted by what each input column
costs at the output under GPTQ, 1 / [chol(H^-1)]_jj^2, instead of the plain weight error; see
``BCQQuantizer.weigh``), refit (True: after compensation, exponents move by +-1 where the
output error under H drops; see ``_bcq.refit_exponents``), refine (2: that many rounds of
re-choosing every code, column by column, as the level nearest its exact minimiser under H,
each followed by the exponent refit; see ``_bcq.refine_codes``).
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from effc.budget import Candidate, convert_layers
from effc.calib import Gram, gram_matrices, single_threaded_blas
from effc.ir import new_initializer, opset
from effc.ops import DOMAIN, use
from effc.ops import shift_add_matmul as op
from effc.passes._bcq import BCQQuantizer, refine_codes, refit_exponents
from effc.passes._gptq import gptq, output_error
from effc.passes._linears import Linear, find_linears
from effc.passes.base import LayerRecord, Pass, PassContext, PassOutcome, Rewrite
from effc.passes.options import option, read
from effc.verify import make_inputs

BITS = (2, 3, 4)


@dataclass
class Options:
    bits: int = option(3, "bit planes per weight", choices=BITS)
    group: int = option(8, "input columns per scale", low=1)
    terms: int = option(1, "powers of two per scale (the llvm/cuda kernels take 1)", choices=(1, 2, 3))
    layers: str | None = option(None, "glob on node names of the linears to rewrite (selecting a protected "
                                "first/last layer includes it)")
    avg_bits: float | None = option(None, "allocate bits per layer, by measured sensitivity, under this average",
                                    low=BITS[0], high=BITS[-1])
    act_order: bool = option(False, "GPTQ: quantize columns in order of decreasing Hessian diagonal")
    compensate: bool = option(True, "GPTQ error compensation on calibration data (false: round to nearest)",
                              needs="calibration")
    block: int = option(128, "GPTQ: columns per lazy-update block", low=1)
    damp: float = option(0.01, "GPTQ: Hessian dampening, as a fraction of its mean diagonal", low=0.0)
    clip: bool = option(True, "keep compensated weights within their original group's magnitude")
    refit: bool = option(True, "after compensation, move exponents by +-1 where the output error drops")
    weighted: bool = option(True, "fit each group's scales to the error weighted by its inputs' GPTQ cost")
    refine: int = option(2, "rounds of code-by-code descent on the exact output error after compensation", low=0)

    @classmethod
    def parse(cls, options) -> Options:
        """Checked options from an instance, a dict of values or None (see effc.passes.options)."""
        return read("shift-add", cls, options)


@dataclass
class Quantized:
    planes: np.ndarray   # uint8 [q, N, K/8]
    codes: np.ndarray    # int8 [q, N, K/group, terms]
    dense: np.ndarray    # float64 [N, K], what the packed form stands for
    error: float         # relative output error under H (weight error without H)

    @property
    def bits_per_weight(self) -> float:
        return op.storage_bits(self.planes, self.codes) / self.dense.size


def quantize_weight(w: np.ndarray, h: np.ndarray | None, bits: int, opts: Options) -> Quantized:
    """BCQ of one weight [N, K]: GPTQ-compensated when ``h`` is given and compensation is on."""
    n, k = w.shape
    quantizer = BCQQuantizer(n, k, bits, opts.group, opts.terms, bound=w if opts.clip else None,
                             weighted=opts.weighted)
    with single_threaded_blas():
        if opts.compensate and h is not None:
            dense = gptq(w, h, quantizer, opts.group, opts.block, opts.damp, opts.act_order)
            if (opts.refit and opts.terms == 1) or opts.refine:
                dense = _polish(w, h, quantizer, opts)
        else:
            dense = quantizer.round_to_nearest(w.astype(np.float64))
        error = output_error(w, dense, h)
    planes = op.pack_planes(quantizer.signs)
    codes = op.encode_terms(quantizer.term_signs, quantizer.term_exps)
    return Quantized(planes, codes, dense, error)


def _polish(w: np.ndarray, h: np.ndarray, quantizer: BCQQuantizer, opts: Options) -> np.ndarray:
    """After compensation, descend on the layer's exact output error under the damped H (as
    GPTQ's): exponents by +-1 (``refit``), then ``refine`` rounds of codes column by column
    followed by exponents again. Each step only ever lowers the error; the quantizer's codes
    change in place and the dense weight they stand for is returned."""
    n, k = w.shape
    damped = h + np.eye(k) * opts.damp * max(float(np.mean(np.diag(h))), 1e-12)
    target = np.where(np.diag(h) == 0, 0.0, w.astype(np.float64))  # as GPTQ: dead inputs
    bound = np.abs(w).reshape(n, k // opts.group, opts.group).max(axis=2) if opts.clip else None
    limit = None if bound is None else 2 * bound  # how far the exponent refit may move a group
    refit = opts.refit and opts.terms == 1
    args = (quantizer.signs, quantizer.term_signs, quantizer.term_exps)
    if refit:
        refit_exponents(target, damped, *args, limit)
    for _ in range(opts.refine):
        drop = refine_codes(target, damped, *args, bound)
        if refit:
            refit_exponents(target, damped, *args, limit)
        if drop < 1e-4:
            break
    return op.dense_weight(op.pack_planes(quantizer.signs), op.encode_terms(quantizer.term_signs, quantizer.term_exps))


class ShiftAdd(Pass):
    name = "shift-add"
    summary = "Linears -> binary planes with power-of-two scales (ShiftAddLLM, GPTQ-compensated; lossy)"
    exact = False
    budgeted = True
    Options = Options  # compensate=true needs calibration data

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        opts = Options.parse(ctx.options)
        outcome = PassOutcome()
        if opset(model) < op.MIN_OPSET:
            outcome.skip("model", f"opset {opset(model)} < {op.MIN_OPSET}, which {op.NAME}'s function needs")
            return outcome
        selected = self.select(model, opts, outcome)
        if not selected:
            return outcome
        # The float layers' inputs: calibration data when given (it also drives compensation), else
        # the seeded random inputs the pipeline checks with, so every rewritten layer still gets its error.
        if ctx.calibration:
            data = f"calibration ({len(ctx.calibration)} samples)"
            grams = gram_matrices(model, ctx.calibration, [lin.x.name for lin in selected])
            hessians = {name: g.hessian() for name, g in grams.items()}
        else:
            data = "seeded random inputs (no calibration)"
            grams = gram_matrices(model, make_inputs(model), [lin.x.name for lin in selected], progress=False)
            hessians = {}
        bits = (allocate_bits(selected, hessians, opts.avg_bits, opts) if opts.avg_bits is not None
                else {lin.name: opts.bits for lin in selected})
        results = {lin.name: quantize_weight(lin.weight, hessians.get(lin.x.name), bits[lin.name], opts)
                   for lin in selected}
        candidates = [Candidate(lin.name, functools.partial(apply_one, name=lin.name, result=results[lin.name]),
                                cost=results[lin.name].error) for lin in selected]
        converted = set(convert_layers(model, candidates, ctx, outcome))
        chosen = [lin for lin in selected if lin.name in converted]
        for lin in chosen:
            outcome.rewrites.append(rewrite_record(lin, results[lin.name], bits[lin.name], opts,
                                                   lin.x.name in hessians))
            if lin.x.name in grams:
                outcome.layers.append(layer_record(lin, results[lin.name], grams[lin.x.name], data))
        return outcome

    @staticmethod
    def select(model: ir.Model, opts: Options, outcome: PassOutcome) -> list[Linear]:
        linears, refused = find_linears(model)
        for node, reason in refused:
            outcome.skip(node, reason)
        selected = []
        for lin in linears:
            k = lin.weight.shape[1]
            if opts.layers and not fnmatch.fnmatchcase(lin.name, opts.layers):
                outcome.skip(lin.node, f"not selected by layers='{opts.layers}'")
            elif lin.protected and not opts.layers:
                outcome.skip(lin.node, f"{lin.protected}; kept dense unless selected by layers")
            elif k % 8 or k % opts.group:
                outcome.skip(lin.node, f"K={k} is not a multiple of 8 and of the group {opts.group}")
            else:
                selected.append(lin)
        return selected


def apply_one(model: ir.Model, name: str, result: Quantized) -> None:
    """Replace the linear named ``name`` in ``model`` by its shift-add form ``result``. Found by name,
    so that the budget can apply it to copies of the model too."""
    lin = next((lin for lin in find_linears(model)[0] if lin.name == name), None)
    if lin is None:
        raise RuntimeError(f"linear {name} is gone from the model")  # a bug: the pass selected it here
    _rewrite(model.graph, lin, result)
    use(model, op.function(opset(model)))
    ir_passes.RemoveUnusedNodesPass()(model)


def rewrite_record(lin: Linear, result: Quantized, bits: int, opts: Options, compensated: bool) -> Rewrite:
    n, k = lin.weight.shape
    return Rewrite(lin.name, "shift-add", {
        "k": k, "n": n, "op": f"{DOMAIN}.{op.NAME}", "bits": bits, "group": opts.group, "terms": opts.terms,
        "bits_per_weight": result.bits_per_weight, "weight_error": result.error,
        "compensated": bool(opts.compensate and compensated)})


def layer_record(lin: Linear, result: Quantized, gram: Gram, data: str) -> LayerRecord:
    """The layer's output y = x W^T + b against y' = x Q^T + b over the rows x that ``gram``
    summarises, from their second moment C and mean m alone (no activations kept):
    mean y.y' = tr(W C Q^T) + b.(W m) + b.(Q m) + b.b, and the error's tr(dW C dW^T)."""
    w, q = lin.weight.astype(np.float64), result.dense
    n = w.shape[0]
    b = np.zeros(n) if lin.bias is None else lin.bias.astype(np.float64)
    c, m = gram.moments()

    def dot(a: np.ndarray, z: np.ndarray) -> float:
        return float(np.sum((a @ c) * z) + b @ (a @ m) + b @ (z @ m) + b @ b)

    d = w - q
    yy, qq, yq, dd = dot(w, w), dot(q, q), dot(w, q), float(np.sum((d @ c) * d))
    rel = float(np.sqrt(max(dd, 0.0) / yy)) if gram.rows and yy > 0 else None
    cosine = float(np.clip(yq / np.sqrt(yy * qq), -1.0, 1.0)) if gram.rows and yy > 0 and qq > 0 else None
    bias_bytes = n * lin.weight.dtype.itemsize  # the rewritten op always takes a bias
    before = lin.weight.nbytes + (0 if lin.bias is None else lin.bias.nbytes)
    after = result.planes.nbytes + result.codes.nbytes + bias_bytes
    return LayerRecord(lin.name, rel, cosine, int(before), int(after), data)


def allocate_bits(linears: list[Linear], hessians: dict[str, np.ndarray], avg_bits: float,
                  opts: Options) -> dict[str, int]:
    """Bits per layer with sum(bits * size) <= avg_bits * sum(size): start every layer at the
    fewest bits, then repeatedly give one more bit to the layer whose round-to-nearest output
    error drops most per weight paid, while the budget allows."""
    rtn = Options(**{**opts.__dict__, "compensate": False})
    errors = {lin.name: {b: quantize_weight(lin.weight, hessians.get(lin.x.name), b, rtn).error for b in BITS}
              for lin in linears}
    sizes = {lin.name: lin.weight.size for lin in linears}
    bits = {name: BITS[0] for name in sizes}
    budget = avg_bits * sum(sizes.values()) - BITS[0] * sum(sizes.values())
    while True:
        options = [((errors[n][bits[n]] - errors[n][bits[n] + 1]) / sizes[n], n) for n in sizes
                   if bits[n] < BITS[-1] and sizes[n] <= budget]
        if not options:
            return bits
        _, name = max(options)
        bits[name] += 1
        budget -= sizes[name]


def _rewrite(graph: ir.Graph, lin: Linear, result: Quantized) -> None:
    n = lin.weight.shape[0]
    dtype = lin.weight.dtype
    bias = lin.bias if lin.bias is not None else np.zeros(n, dtype=dtype)
    inputs = [lin.x,
              new_initializer(graph, result.planes, f"{lin.name}.planes"),
              new_initializer(graph, result.codes, f"{lin.name}.scale_codes"),
              new_initializer(graph, bias.astype(dtype), f"{lin.name}.bias")]
    node = ir.Node(DOMAIN, op.NAME, inputs, name=f"{lin.name}.shift_add", num_outputs=1)
    old, new = lin.output, node.outputs[0]
    new.shape, new.type, new.name = old.shape, old.type, f"{old.name}_shift_add"
    last = lin.bias_add or lin.node
    graph.insert_after(last, node)
    if old.is_graph_output():  # keep the model's output name
        name = old.name
        graph.outputs[graph.outputs.index(old)] = new
        old.name, new.name = f"{name}_dense", name
    old.replace_all_uses_with(new)
    graph.remove([lin.node] + ([lin.bias_add] if lin.bias_add else []), safe=True)
