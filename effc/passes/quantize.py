"""quantize: integer linears as standard QDQ ONNX that ONNX Runtime and OpenVINO run as int8/int4 (lossy).

Only MatMul/Gemm linears with a constant weight are quantized; everything else (LayerNorm,
Softmax and the Add before it, residual Adds, GELU) stays float, which is what transformers
need (ONNX Runtime's own tool collapses them unless told so: its issues #11286, #9599).

Modes (``mode``):
- ``w8a8``: static int8 weights (symmetric, per output channel) and activations (per tensor,
  uint8 asymmetric or int8 symmetric) with ranges from calibration: ``calibrate`` = minmax |
  percentile | entropy over streamed fixed-size histograms (``_observers``).
- ``w8a8-dynamic``: activation scales computed at run time (DynamicQuantizeLinear).
- ``w8``, ``w4``: weight-only, symmetric per block of ``block`` input columns (0: per output
  channel); blocked scales and int4 need opset 21.
Accuracy: ``smoothquant_alpha`` (SmoothQuant, folded exactly into the writer of each linear's
input and checked in ONNX Runtime, ``_smoothquant``), ``repq`` (RepQ-ViT: a norm's per-channel
activation ranges re-parameterised into one per-tensor range, folded the same way), ``gptq`` (GPTQ rounding under H from
calibration; default on for w4 with calibration data), clip-ratio search for every weight group
(``_qparams``). Placement follows ONNX Runtime's QDQ conventions (``_qdq``).

Each quantized layer gets a Rewrite (scales, zero point, clip ratios) and a LayerRecord: its
output against the float layer's on the calibration data, with effc's numpy reference of the
quantized layer (``_qparams.linear_reference``). With ``ctx.budget`` the shared accuracy budget
picks the layers, and the most harmful stay float with their measured reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from effc.budget import Candidate, convert_layers
from effc.calib import gram_matrices, row_mask, stream_values
from effc.errors import EffcError
from effc.ir import copy_model, opset
from effc.passes import _smoothquant as sq
from effc.passes._linears import Linear, find_linears
from effc.passes._observers import METHODS, observe
from effc.passes._qdq import DYNAMIC, STATIC, WEIGHT_ONLY, LayerPlan, rewrite_layer
from effc.passes._qparams import ActParams, act_params, linear_reference, quantize_weight
from effc.passes.base import LayerRecord, Pass, PassContext, PassOutcome
from effc.passes.options import option, read
from effc.verify import OrtRunner, deviation, make_inputs

MODES = ("w8a8", "w8a8-dynamic", "w8", "w4")
SCHEME = {"w8a8": STATIC, "w8a8-dynamic": DYNAMIC, "w8": WEIGHT_ONLY, "w4": WEIGHT_ONLY}
BLOCKED_OPSET = 21  # DequantizeLinear's block_size and int4
RECORD_SAMPLES = 64  # layer errors are measured on at most this many calibration samples


@dataclass
class Options:
    mode: str = option("w8a8", "w8a8 (static activations), w8a8-dynamic, w8 or w4 (weight-only)", choices=MODES)
    calibrate: str = option("auto", "w8a8: activation ranges from streamed histograms; auto: per activation, "
                            "whichever method's quantized layer outputs are closest to float",
                            choices=("auto", *METHODS))
    percentile: float = option(99.99, "calibrate=percentile: the quantile kept at each end", low=90.0, high=100.0)
    activations: str = option("uint8", "w8a8: uint8 asymmetric (ONNX Runtime's u8 x s8 kernels) or int8 symmetric",
                              choices=("uint8", "int8"))
    block: int | None = option(None, "w8/w4: input columns per weight scale, 0 = per output channel "
                               "(default: 128 for w4, per channel for w8)", choices=(0, 16, 32, 64, 128, 256))
    gptq: bool | None = option(None, "GPTQ rounding of the weights on calibration data (default: on for w4 "
                               "when calibration is given)", needs="calibration")
    damp: float = option(0.01, "GPTQ: Hessian dampening, as a fraction of its mean diagonal", low=0.0)
    act_order: bool = option(False, "GPTQ: quantize columns in order of decreasing Hessian diagonal")
    clip: bool = option(True, "search each weight group's clip ratio (least squared error)")
    smoothquant_alpha: float | None = option(None, "SmoothQuant migration strength (0.5 typical), w8a8 modes",
                                             low=0.0, high=1.0)
    repq: bool = option(False, "w8a8 modes: RepQ-ViT: re-parameterise each norm-written activation's per-channel "
                        "ranges into the per-tensor one (scale and shift folded into the norm and the linears; "
                        "with smoothquant_alpha, SmoothQuant takes the other sites)")
    exclude: str | None = option(None, "comma-separated op types and node-name globs of linears to keep float")
    ends: bool = option(False, "also quantize the first and last linears (and weights tied to an embedding)")

    @classmethod
    def parse(cls, options) -> Options:
        return read("quantize", cls, options)


class Quantize(Pass):
    name = "quantize"
    summary = "Linears -> int8/int4 QDQ (static or dynamic activations, or weight-only; ORT/OpenVINO fuse it; lossy)"
    exact = False
    budgeted = True
    Options = Options

    @classmethod
    def missing(cls, opts: Options, have: set[str]) -> str | None:
        reason = super().missing(opts, have)
        if reason or "calibration" in have:
            return reason
        if opts.mode == "w8a8":
            return ("quantize.mode=w8a8 (static activation scales) needs calibration data: give --calib FILE.npz "
                    "or zoo:NAME, or --set quantize.mode=w8a8-dynamic")
        if opts.smoothquant_alpha is not None or opts.repq:
            which = "repq" if opts.repq else "smoothquant_alpha"
            return f"quantize.{which} needs calibration data: give --calib FILE.npz or zoo:NAME"
        return None

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        opts = Options.parse(ctx.options)
        if opts.smoothquant_alpha is not None and opts.mode not in ("w8a8", "w8a8-dynamic"):
            raise EffcError(f"quantize.smoothquant_alpha applies to w8a8 modes, not mode={opts.mode}")
        if opts.repq and opts.mode not in ("w8a8", "w8a8-dynamic"):
            raise EffcError(f"quantize.repq applies to w8a8 modes, not mode={opts.mode}")
        if opts.block and SCHEME[opts.mode] != WEIGHT_ONLY:
            raise EffcError(f"quantize.block applies to w8/w4, not mode={opts.mode} (per output channel)")
        outcome = PassOutcome()
        scheme, bits = SCHEME[opts.mode], 4 if opts.mode == "w4" else 8
        block = (128 if bits == 4 else 0) if opts.block is None else opts.block
        selected = select(model, opts, block, outcome)
        if not selected:
            return outcome
        if scheme == WEIGHT_ONLY and (block or bits == 4) and opset(model) < BLOCKED_OPSET:
            reason = upgrade_opset(model, BLOCKED_OPSET)
            if reason:
                kind = "int4" if bits == 4 else "blocked"
                outcome.skip("model", f"opset {opset(model)} < {BLOCKED_OPSET}, which {kind} DequantizeLinear needs, "
                             f"and the upgrade failed: {reason}")
                return outcome
            outcome.rewrite("model", "upgrade-opset", to=BLOCKED_OPSET)
            selected = select(model, opts, block, PassOutcome())
        feeds = ctx.calibration
        if opts.smoothquant_alpha is not None or opts.repq:
            smooth(model, selected, feeds, opts.smoothquant_alpha, outcome, repq=opts.repq)
            selected = [lin for lin in find_linears(model)[0] if lin.name in {s.name for s in selected}]
        candidates: dict[str, dict[str, ActParams]] = {}
        if scheme == STATIC:
            observers = observe(model, feeds, [lin.x.name for lin in selected])
            signed = opts.activations == "int8"
            methods = METHODS if opts.calibrate == "auto" else (opts.calibrate,)
            for name, obs in observers.items():
                candidates[name] = {m: act_params(*obs.range(m, opts.percentile), signed, (obs.lo, obs.hi))
                                    for m in methods}
        use_gptq = bool(feeds) and (opts.gptq if opts.gptq is not None else bits == 4)
        hessians = {}
        if use_gptq:
            grams = gram_matrices(model, feeds, [lin.x.name for lin in selected])
            hessians = {name: g.hessian() for name, g in grams.items()}
        plans = []
        for lin in selected:
            group = block or lin.weight.shape[1]
            weight = quantize_weight(lin.weight, hessians.get(lin.x.name), bits, group, use_gptq, opts.damp,
                                     opts.act_order, opts.clip)
            first = next(iter(candidates[lin.x.name].values())) if lin.x.name in candidates else None
            plans.append(LayerPlan(lin, weight, first, scheme))
        data = (f"calibration ({min(len(feeds), RECORD_SAMPLES)} samples)" if feeds
                else "seeded random inputs (no calibration)")
        records, methods_chosen = measure_layers(model, plans, feeds[:RECORD_SAMPLES] if feeds else make_inputs(model),
                                                 candidates)
        chosen = choose(model, plans, records, ctx, outcome)
        for plan in plans:
            if plan.name not in chosen:
                continue
            info = details(plan, opts.mode, use_gptq and plan.lin.x.name in hessians)
            if plan.lin.x.name in methods_chosen:
                info["calibrate"] = methods_chosen[plan.lin.x.name]
            outcome.rewrite(plan.name, "quantize", **info)
            rel, cos, before, after = records[plan.name]
            outcome.layers.append(LayerRecord(plan.name, rel, cos, before, after, data))
        ir_passes.RemoveUnusedNodesPass()(model)
        return outcome


def upgrade_opset(model: ir.Model, target: int) -> str | None:
    """Convert ``model`` in place to opset ``target`` (checked equivalent in ONNX Runtime); why not, or None."""
    from effc.frontend.onnx import from_proto
    from effc.ir import to_proto

    try:
        model.graph = from_proto(to_proto(model), opset=target).graph
    except EffcError as exc:
        return str(exc)
    return None


def select(model: ir.Model, opts: Options, block: int, outcome: PassOutcome) -> list[Linear]:
    linears, refused = find_linears(model)
    for node, reason in refused:
        outcome.skip(node, reason)
    if not linears and not refused:
        outcome.skip("model", "no MatMul/Gemm linear with a constant float weight to quantize")
    patterns = [p.strip() for p in (opts.exclude or "").split(",") if p.strip()]
    selected = []
    for lin in linears:
        k = lin.weight.shape[1]
        hit = next((p for p in patterns if p == lin.node.op_type or fnmatch.fnmatchcase(lin.name, p)), None)
        if hit:
            outcome.skip(lin.node, f"excluded by '{hit}'")
        elif lin.protected and not opts.ends:
            outcome.skip(lin.node, f"{lin.protected}; kept float (quantize.ends=true includes it)")
        elif block and k % block:
            outcome.skip(lin.node, f"K={k} is not a multiple of the block {block}")
        else:
            selected.append(lin)
    return selected


def smooth(model: ir.Model, selected: list[Linear], feeds, alpha: float | None, outcome: PassOutcome,
           repq: bool = False) -> None:
    """SmoothQuant (or with ``repq``, RepQ-ViT's re-parameterisation) of every foldable site, each
    fold checked in ONNX Runtime against the unsmoothed model."""
    sites, refused = sq.find_sites(selected)
    for name, reason in refused:
        outcome.skip(name, f"not smoothed: {reason}")
    if not sites:
        return
    stats = observe(model, feeds, [s.x.name for s in sites])
    check = feeds[:4]
    original = copy_model(model)
    reference = OrtRunner(original).run_all(check)
    by_output = {lin.output.name: lin for lin in find_linears(model)[0]}
    folded = []
    for site in sites:
        o = stats[site.x.name]
        by_repq = repq and site.x.producer().op_type in sq.NORMS  # RepQ-ViT for norms, SmoothQuant elsewhere
        if not by_repq and alpha is None:
            outcome.skip(site.x.name, f"not smoothed: RepQ-ViT folds only into a norm, and this is written by "
                         f"{site.x.producer().op_type}; set quantize.smoothquant_alpha to smooth it")
            continue
        s, t = (sq.repq_scales(site, o.channel_min, o.channel_max) if by_repq
                else (sq.smoothing_scales(site, o.channel_absmax, alpha), None))
        reason = sq.fold(site, s, by_output, t)
        if reason:
            outcome.skip(site.x.name, f"not smoothed: {reason}")
        else:
            folded.append((site, s, t))
    if not folded:
        return

    def exact_error() -> float:
        return deviation(OrtRunner(model).run_all(check), reference).max_rel

    if exact_error() > sq.EXACT:  # find the culprits one site at a time
        for site, *_ in folded:
            sq.undo(site)
        kept = []
        for site, s, t in folded:
            sq.fold(site, s, by_output, t)
            err = exact_error()
            if err > sq.EXACT:
                sq.undo(site)
                outcome.skip(site.x.name,
                             f"not smoothed: the fold changes the model output by {err:.2g} > {sq.EXACT:g}")
            else:
                kept.append((site, s, t))
        folded = kept
    for site, s, t in folded:
        if t is not None:
            outcome.rewrite(site.x.name, "repq", into=site.writer, readers=[lin.name for lin in site.readers],
                            scale_min=float(s.min()), scale_max=float(s.max()), shift_absmax=float(np.abs(t).max()))
        else:
            outcome.rewrite(site.x.name, "smooth", alpha=alpha, into=site.writer,
                            readers=[lin.name for lin in site.readers], scale_min=float(s.min()),
                            scale_max=float(s.max()))


def measure_layers(model: ir.Model, plans: list[LayerPlan], feeds, candidates: dict[str, dict[str, ActParams]]
                   | None = None) -> tuple[dict[str, tuple], dict[str, str]]:
    """Per layer: (rel error, cosine, bytes before, bytes after) of its quantized output (effc's
    numpy reference) against the float layer, on the float model's own inputs to the layer.

    Static layers: each candidate activation range of ``candidates`` is measured, and each
    activation keeps the one with the least summed squared relative error over the layers reading
    it (the plans are updated); returns the records and {activation: chosen method}."""
    candidates = candidates or {}
    options = {p.name: candidates.get(p.lin.x.name) or {"": p.act} for p in plans}
    sums = {p.name: {m: np.zeros(4) for m in options[p.name]} for p in plans}  # |y|^2, |y'|^2, y.y', |y-y'|^2
    by_x: dict[str, list[LayerPlan]] = {}
    for p in plans:
        by_x.setdefault(p.lin.x.name, []).append(p)
    float_t = {p.name: np.ascontiguousarray(p.lin.weight.T.astype(np.float64)) for p in plans}
    for feed, values in stream_values(model, feeds, list(by_x), progress=False):
        mask = row_mask(feed)
        for name, x in values.items():
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
            keep = mask if mask is not None and mask.size == x2.shape[0] else slice(None)
            for p in by_x[name]:
                y = x2.astype(np.float64) @ float_t[p.name]
                if p.lin.bias is not None:
                    y = y + p.lin.bias
                y = y[keep]
                for method, act in options[p.name].items():
                    # the dynamic scale is the whole tensor's, as DynamicQuantizeLinear sees it
                    yq = linear_reference(x2, p.weight, p.lin.bias, act, p.scheme == DYNAMIC).astype(np.float64)[keep]
                    sums[p.name][method] += [np.sum(y * y), np.sum(yq * yq), np.sum(y * yq), np.sum((y - yq) ** 2)]
    chosen: dict[str, str] = {}
    for name, readers in by_x.items():
        methods = list(options[readers[0].name])
        cost = {m: sum(sums[p.name][m][3] / max(sums[p.name][m][0], 1e-300) for p in readers) for m in methods}
        best = min(methods, key=lambda m: cost[m])
        if best:
            chosen[name] = best
        for p in readers:
            p.act = options[p.name][best]
    out = {}
    for p in plans:
        yy, qq, yq, dd = sums[p.name][chosen.get(p.lin.x.name, "")]
        rel = float(np.sqrt(dd / yy)) if yy > 0 else None
        cos = float(np.clip(yq / np.sqrt(yy * qq), -1, 1)) if yy > 0 and qq > 0 else None
        out[p.name] = (rel, cos, *layer_bytes(p))
    return out, chosen


def layer_bytes(plan: LayerPlan) -> tuple[int, int]:
    w, lin = plan.weight, plan.lin
    n, k = lin.weight.shape
    bias = 0 if lin.bias is None else 4 * n
    after = (n * k * w.bits + 7) // 8 + w.scale.nbytes + bias
    if plan.act is not None:
        after += 5  # the activation's scale and zero point
    return int(lin.weight.nbytes + bias), int(after)


def choose(model: ir.Model, plans: list[LayerPlan], records: dict[str, tuple], ctx: PassContext,
           outcome: PassOutcome) -> set[str]:
    """Rewrite the layers: all of them, or those the shared accuracy budget accepts (the rest stay
    float, each with its measured reason)."""
    by_name = {p.name: p for p in plans}

    def apply(name: str):
        def run(target: ir.Model) -> None:
            lin = next(lin for lin in find_linears(target)[0] if lin.name == name)
            plan = by_name[name]
            rewrite_layer(target.graph, LayerPlan(lin, plan.weight, plan.act, plan.scheme))
        return run

    candidates = [Candidate(p.name, apply(p.name), records[p.name][0]) for p in plans]
    return set(convert_layers(model, candidates, ctx, outcome))


def details(plan: LayerPlan, mode: str, gptq: bool) -> dict:
    w, n, k = plan.weight, *plan.lin.weight.shape
    out = {"mode": mode, "k": k, "n": n, "bits": w.bits,
           "block": "per-channel" if w.group == k else w.group,
           "weight_scale_min": float(w.scale.min()), "weight_scale_max": float(w.scale.max()),
           "weight_clip_ratio": round(w.clip_ratio, 4), "gptq": gptq, "weight_error": w.error}
    if plan.act is not None:
        a = plan.act
        out.update(act_dtype="int8" if a.signed else "uint8", act_scale=a.scale, act_zero_point=a.zero_point,
                   act_clip_ratio=round(a.clip_ratio, 4))
    elif plan.scheme == DYNAMIC:
        out.update(act_dtype="uint8", act_scale="dynamic")
    return out
