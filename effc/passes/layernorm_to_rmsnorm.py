"""Exact Pre-LN -> Pre-RMSNorm conversion (Jiang et al., NeurIPS 2023).

LN(x) = RMSNorm(x - mean(x)). When every writer of the residual stream produces vectors that are
zero-mean over the hidden axis, the stream is zero-mean and each LayerNorm reading it equals an
RMSNorm with the same epsilon and gamma (beta stays as an Add). The writers are made zero-mean by
recentring their weights over the output features: W <- W - mean_out(W), b <- b - mean(b).

The proof and the planned edits come from :mod:`effc.passes._residual_stream`; nothing is changed
unless every LayerNorm of the model is proven convertible (all-or-nothing), so a refused model is
left exactly as it was. A stream that starts at a LayerNorm (a patch-embedding norm) gets one
explicit mean subtraction there. Post-LN models (BERT) are refused: LayerNorms inside the stream
write it, and blocks read their outputs directly.

Options: ``untie`` (default True) lets a recentred constant that other nodes also read (a tied
embedding / LM head) be copied; with ``untie=False`` such a model is refused instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from effc.ir import opset
from effc.passes._norm_sites import NormSite, centre_output, convert, find_sites
from effc.passes._recentre import install
from effc.passes._residual_stream import ResidualStream
from effc.passes.base import Pass, PassContext, PassOutcome
from effc.passes.options import option


@dataclass
class Options:
    untie: bool = option(True, "copy a recentred constant that other nodes also read (a tied embedding / "
                         "LM head); false: refuse such a model")


class LayerNormToRMSNorm(Pass):
    name = "layernorm-to-rmsnorm"
    summary = "Pre-LN LayerNorm -> RMSNorm by recentring the residual stream's writers (exact)"
    exact = True
    Options = Options

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        outcome = PassOutcome()
        graph = model.graph
        sites, rejected = find_sites(graph)
        for node, reason in rejected:
            outcome.skip(node, reason)
        if not sites:
            return outcome
        plan = ResidualStream(sites, untie=self.read_options(ctx.options).untie).plan()
        failing = [(site, reason) for site, reason in zip(sites, plan.failures) if reason]
        if failing or rejected:
            _refuse_all(outcome, sites, failing, rejected)
            return outcome
        # Constants this pass may leave unread, dropped at the end.
        orphans = [r.value for r in plan.replacements] + [v for m, _ in plan.bypass for v in m.inputs]
        orphans += [v for site in sites for n in site.nodes for v in n.inputs]
        outcome.rewrites += install(graph, plan.replacements)
        for mul, index in plan.bypass:
            mul.outputs[0].replace_all_uses_with(mul.inputs[index])
            graph.remove(mul, safe=True)
            outcome.rewrite(mul, "fold-layerscale")
        version = opset(model)
        outcome.rewrites += [centre_output(site, graph, version) for site in plan.starts]
        outcome.rewrites += [convert(site, graph, version) for site in sites]
        _drop_orphans(graph, orphans)
        return outcome


def _refuse_all(outcome: PassOutcome, sites: list[NormSite], failing: list[tuple[NormSite, str]],
                rejected: list[tuple[ir.Node, str]]) -> None:
    """One Skip per failing site with its reason; the others are held back (all-or-nothing)."""
    for site, reason in failing:
        outcome.skip(site.name, f"{site.label}: {reason}")
    blocked = len(failing) + len(rejected)
    post_ln = [site for site, reason in failing if "post-LN" in reason]
    # A stream value read outside the proof is often only a consequence of another site's failure.
    causes = sorted(failing, key=lambda f: "without a LayerNorm" in f[1])
    first = (f"{causes[0][0].label}: {causes[0][1]}" if failing else
             f"{rejected[0][0].op_type} '{rejected[0][0].name}': {rejected[0][1]}")
    why = (f"the model is post-LN (see {post_ln[0].label})" if post_ln else
           f"{blocked} other LayerNorm(s) cannot be converted (first: {first}) and the stream is converted "
           "all-or-nothing")
    failed = {id(site) for site, _ in failing}
    for site in sites:
        if id(site) not in failed:
            outcome.skip(site.name, f"{site.label}: convertible, but held back: {why}")


def _drop_orphans(graph: ir.Graph, candidates: list[ir.Value | None]) -> None:
    """Remove the constants among ``candidates`` that this pass left without readers."""
    dead_nodes = {}
    for value in {id(v): v for v in candidates if v is not None}.values():
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer() and graph.initializers.get(value.name) is value:
            del graph.initializers[value.name]
        elif value.producer() is not None and value.producer().op_type == "Constant":
            dead_nodes[id(value.producer())] = value.producer()
    if dead_nodes:
        graph.remove(list(dead_nodes.values()), safe=True)
