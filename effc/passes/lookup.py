"""lookup: linears replaced by table lookups built post-training from calibration data (lossy).

Each selected MatMul/Gemm y = x W^T + b becomes ``effc.LookupLinear``: x is split into C chunks
of v dims, each chunk is encoded to one of k codes, and y is the sum of one table row per chunk
plus b. Encoders: ``pq`` (nearest of k centroids learnt by k-means on the layer's calibration
inputs, as LUT-NN / MADDNESS) and ``hash`` (MemoryFormer's sign bits of each dim around a
threshold from its calibration values, k = 2^v: the 1-bit Lloyd-Max split by default, or the
median; ``soft`` adds its row weights prod sigmoid(2|z|)). Tables start as
centroid . W_c^T and are refitted jointly by ridge least squares against the dense layer's outputs
on the calibration rows (see ``_lookup_fit``); int8 tables keep one scale per table.

Activations are streamed through ONNX Runtime once, each layer's input kept as a bounded uniform
sample (``rows`` rows, reservoir sampling), so calibration memory does not grow with the data.
Under an accuracy budget (``ctx.budget``, see effc.budget) layers are converted least harmful
first while the outputs on the held-out split of the calibration data stay within it, the rest
kept dense with the measured reason; without one, every selected layer is converted.

Options (ctx.options): encoder (pq), v (chunk dims; default 16 for pq, 2 for hash), k (codes,
pq; 16), table_dtype (int8), layers (glob on node names; selecting a protected layer includes
it), soft (true for hash; hash only), centres (lloyd | median; hash only), iters (k-means iterations, 25),
rows (sampled rows per layer, 4096), ridge (0.1), refit (true).
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from effc.budget import Candidate, convert_layers
from effc.calib import sample_rows, single_threaded_blas
from effc.errors import EffcError
from effc.ir import new_initializer, opset
from effc.ops import DOMAIN, use
from effc.ops import lookup_linear as op
from effc.passes._linears import Linear, find_linears
from effc.passes._lookup_fit import CENTRES, Encoding, Fitted, encode_rows, fit_linear
from effc.passes.base import LayerRecord, Pass, PassContext, PassOutcome, Rewrite
from effc.passes.options import option, read

DEFAULT_V = {"pq": 16, "hash": 2}


@dataclass
class Options:
    encoder: str = option("pq", "how a chunk is encoded: nearest centroid (pq) or sign bits (hash)",
                          choices=op.ENCODERS)
    v: int | None = option(None, "input dims per chunk (must divide the input width; none: 16 for pq, 2 for hash)",
                           low=1)
    k: int = option(16, "codes per chunk (pq; hash has 2^v)", low=2, high=256)
    table_dtype: str = option("int8", "table element type (int8: one scale per table)", choices=("int8", "float32"))
    layers: str | None = option(None, "glob on node names of the linears to rewrite (selecting a protected "
                                "first/last layer includes it)")
    soft: bool | None = option(None, "hash: weight each row by MemoryFormer's prod sigmoid(2|z|) (none: true for "
                               "hash, false for pq)")
    centres: str = option("lloyd", "hash: each dim's sign threshold, the optimal 1-bit split of its calibration "
                          "values (lloyd) or their median", choices=CENTRES)
    iters: int = option(25, "k-means iterations (pq)", low=1)
    rows: int = option(4096, "calibration rows sampled per layer (bounds calibration memory)", low=16)
    ridge: float = option(0.1, "refit: pull towards the centroid tables, in rows per code", low=0.0)
    refit: bool = option(True, "refit the tables by least squares against the dense layer's outputs")

    def __post_init__(self):
        chunk = self.chunk
        if self.encoder == "hash" and chunk > op.MAX_HASH_BITS:
            raise EffcError(f"lookup.v={chunk}: hash chunks need 2^v codes, so v <= {op.MAX_HASH_BITS}")
        if self.soft and self.encoder != "hash":
            raise EffcError("lookup.soft=true needs lookup.encoder=hash (pq rows have no soft weight)")

    @property
    def chunk(self) -> int:
        return self.v if self.v is not None else DEFAULT_V[self.encoder]

    @property
    def weighted(self) -> bool:
        """Soft row weights: asked for, or by default with hash (its 2-dim soft chunks beat 4-dim sign
        buckets on every zoo model, docs/lookup.md)."""
        return self.soft if self.soft is not None else self.encoder == "hash"

    @property
    def codes(self) -> int:
        return self.k if self.encoder == "pq" else 2 ** self.chunk

    @classmethod
    def parse(cls, options) -> Options:
        """Checked options from an instance, a dict of values or None (see effc.passes.options)."""
        opts = read("lookup", cls, options)
        opts.__post_init__()  # an instance built in code is checked as well
        return opts


class Lookup(Pass):
    name = "lookup"
    summary = "Linears -> table lookups (product-quantized or sign-hashed chunks; calibrated; lossy)"
    exact = False
    budgeted = True
    needs = ("calibration",)
    Options = Options

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        opts = Options.parse(ctx.options)
        outcome = PassOutcome()
        if opset(model) < op.MIN_OPSET:
            outcome.skip("model", f"opset {opset(model)} < {op.MIN_OPSET}, which {op.NAME}'s function needs")
            return outcome
        if not ctx.calibration:
            raise EffcError(f"pass '{self.name}' needs calibration data: give --calib FILE.npz or zoo:NAME")
        linears, selected = select(model, opts, outcome)
        if not selected:
            return outcome
        samples = sample_rows(model, ctx.calibration, [lin.x.name for lin in selected], opts.rows)
        data = f"calibration ({len(ctx.calibration)} samples)"
        fits: dict[str, Fitted] = {}
        encodings: dict[str, Encoding] = {}  # by input: q, k and v projections share one encoder
        for lin in selected:
            rows = samples[lin.x.name].rows
            if rows is None or len(rows) < opts.codes:
                outcome.skip(lin.node, f"{0 if rows is None else len(rows)} calibration rows, fewer than "
                             f"{opts.codes} codes")
                continue
            with single_threaded_blas():
                if lin.x.name not in encodings:
                    encodings[lin.x.name] = encode_rows(rows, opts.encoder, opts.chunk, opts.k, opts.weighted, opts.iters,
                                                        opts.ridge, opts.refit, seed=len(encodings),
                                                        centres=opts.centres)
                fits[lin.name] = fit_linear(lin.weight, lin.bias, rows, encodings[lin.x.name], opts.table_dtype)
        del samples, encodings
        accepted = convert(model, fits, opts, ctx, outcome)
        total = sum(lin.weight.size for lin in linears)
        by_name = {lin.name: lin for lin in selected}
        for name in accepted:
            lin, fit = by_name[name], fits[name]
            outcome.rewrites.append(rewrite_record(lin, fit, opts, total))
            outcome.layers.append(LayerRecord(name, fit.rel_error, fit.cosine, _dense_bytes(lin),
                                              fit.table_bytes + fit.bias.nbytes, data))
        return outcome


def select(model: ir.Model, opts: Options, outcome: PassOutcome) -> tuple[list[Linear], list[Linear]]:
    """(every candidate linear, the ones to convert); the others are skipped with the reason.
    EffcError when the chunk size divides the input width of none of the layers asked for."""
    linears, refused = find_linears(model)
    for node, reason in refused:
        outcome.skip(node, reason)
    if not linears and not refused:
        outcome.skip("model", "no linear (MatMul/Gemm with a constant 2-D weight) to replace")
    asked, selected = [], []
    for lin in linears:
        k = lin.weight.shape[1]
        if opts.layers and not fnmatch.fnmatchcase(lin.name, opts.layers):
            outcome.skip(lin.node, f"not selected by layers='{opts.layers}'")
        elif lin.protected and not opts.layers:
            outcome.skip(lin.node, f"{lin.protected}; kept dense unless selected by layers")
        else:
            asked.append(lin)
            if k % opts.chunk:
                outcome.skip(lin.node, f"chunk size v={opts.chunk} does not divide the input width K={k}")
            else:
                selected.append(lin)
    if asked and not selected:
        widths = sorted({lin.weight.shape[1] for lin in asked})
        raise EffcError(f"lookup.v={opts.chunk} divides the input width of none of the selected linears "
                        f"(K = {', '.join(map(str, widths))})")
    return linears, selected


def convert(model: ir.Model, fits: dict[str, Fitted], opts: Options, ctx: PassContext,
            outcome: PassOutcome) -> list[str]:
    """Install the fitted layers: all of them, or under ``ctx.budget`` those choose_layers accepts
    (the refused ones skipped with its measured reason). Returns the names converted."""
    if not fits:
        return []
    candidates = [Candidate(name, functools.partial(install, name=name, fit=fit, opts=opts), cost=fit.rel_error)
                  for name, fit in fits.items()]
    accepted = convert_layers(model, candidates, ctx, outcome)
    ir_passes.RemoveUnusedNodesPass()(model)
    return accepted


def install(model: ir.Model, name: str, fit: Fitted, opts: Options) -> ir.Node:
    """Replace the linear named ``name`` in ``model`` by its LookupLinear (found by name, so this
    works on copies of the model the constants were fitted on)."""
    lin = next((lin for lin in find_linears(model)[0] if lin.name == name), None)
    if lin is None:
        raise EffcError(f"lookup: no linear named '{name}' in the model")
    graph = model.graph
    inputs = [lin.x,
              new_initializer(graph, fit.encoder_const, f"{name}.{'centroids' if opts.encoder == 'pq' else 'centres'}"),
              new_initializer(graph, fit.tables, f"{name}.tables"),
              new_initializer(graph, fit.table_scale, f"{name}.table_scale"),
              new_initializer(graph, fit.bias, f"{name}.bias")]
    node = ir.Node(DOMAIN, op.NAME, inputs, name=f"{name}.lookup", num_outputs=1,
                   attributes=[ir.AttrString("encoder", opts.encoder), ir.AttrInt64("v", opts.chunk),
                               ir.AttrInt64("soft", int(opts.weighted))])
    old, new = lin.output, node.outputs[0]
    new.shape, new.type, new.name = old.shape, old.type, f"{old.name}_lookup"
    graph.insert_after(lin.bias_add or lin.node, node)
    if old.is_graph_output():  # keep the model's output name
        output = old.name
        graph.outputs[graph.outputs.index(old)] = new
        old.name, new.name = f"{output}_dense", output
    old.replace_all_uses_with(new)
    graph.remove([lin.node] + ([lin.bias_add] if lin.bias_add else []), safe=True)
    use(model, op.function(opset(model)))
    return node


def rewrite_record(lin: Linear, fit: Fitted, opts: Options, total_weights: int) -> Rewrite:
    n, k = lin.weight.shape
    return Rewrite(lin.name, "lookup", {
        "k": k, "n": n, "op": f"{DOMAIN}.{op.NAME}", "encoder": opts.encoder, "v": opts.chunk,
        "codes": opts.codes, "table_dtype": opts.table_dtype, "soft": opts.weighted,
        **({"centres": opts.centres} if opts.encoder == "hash" else {}),
        "mac_fraction": lin.weight.size / max(total_weights, 1),  # of every linear's MACs per row
        "table_bytes": fit.table_bytes, "rel_error": fit.rel_error, "refit": opts.refit})


def _dense_bytes(lin: Linear) -> int:
    return int(lin.weight.nbytes + (0 if lin.bias is None else lin.bias.nbytes))
