"""Pass registry: kebab-case name -> Pass class.

Which pass owns which helper module (underscored modules are private to the passes):

- fold-batchnorm (``fold_batchnorm``): ``_affine`` (BN / RepBN sites read as a per-channel
  affine), ``_rescale`` (scaling a linear's input or output channels).
- layernorm-to-rmsnorm (``layernorm_to_rmsnorm``): ``_norm_sites`` (finding and rewriting
  LayerNorms), ``_residual_stream`` (the zero-mean proof), ``_stream_axes`` (how ops move the
  hidden axis), ``_recentre`` (recentring constants), ``_tied_correction`` (tied embeddings).
- shift-add (``shift_add``): ``_linears`` (candidate linears and protected layers), ``_bcq``
  (binary-coded quantizer), ``_gptq`` (error compensation), ``_uniform`` (uniform baseline,
  used by tools/shift_add_accuracy.py).
- lookup (``lookup``): ``_linears`` (shared with shift-add), ``_lookup_fit`` (k-means, hash
  centres, the table refit, int8 tables).
- quantize (``quantize``): ``_observers`` (streamed fixed-size activation histograms),
  ``_qparams`` (quantization arithmetic and the numpy reference), ``_qdq`` (ONNX Runtime's
  QDQ placement), ``_smoothquant`` (exact SmoothQuant and RepQ-ViT folds), ``_qdq_reference``
  (the QDQ graph in numpy); shares ``_linears`` and ``_gptq``.
- prune-tokens (``prune_tokens``): ``_token_blocks`` (finding an encoder's blocks, stream, keys and
  mask), ``_token_ops`` (the ONNX subgraphs that score, keep and merge tokens), ``_token_schedule``
  (tokens per block from a FLOP target or a list).
- shared: ``_op_semantics`` (what each op does to a per-channel quantity, asked by property by
  all three analyses), ``base`` (the pass contract and its records), ``cleanup`` (run after
  every pass by the pipeline).
"""

from __future__ import annotations

from effc.errors import EffcError
from effc.passes.base import Pass, PassContext, PassOutcome, Skip
from effc.passes.fold_batchnorm import FoldBatchNorm  # noqa: E402
from effc.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from effc.passes.lookup import Lookup
from effc.passes.prune_tokens import PruneTokens
from effc.passes.quantize import Quantize
from effc.passes.shift_add import ShiftAdd

REGISTRY: dict[str, type[Pass]] = {p.name: p for p in (FoldBatchNorm, LayerNormToRMSNorm, ShiftAdd, Quantize,
                                                       Lookup, PruneTokens)}

# What `effc compile` runs when --passes is not given: the exact passes (lossy ones only on request).
DEFAULT_PASSES = ("fold-batchnorm", "layernorm-to-rmsnorm")


def get_pass(name: str) -> Pass:
    try:
        return REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise EffcError(f"unknown pass '{name}' (known: {known})") from None


def parse_pass_list(text: str | None) -> list[Pass]:
    """Pass objects for a comma-separated list; None means the defaults, "none" means no pass."""
    if text is not None and text.strip().lower() == "none":
        return []
    names = DEFAULT_PASSES if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EffcError("--passes is empty (use --passes none to run no pass)")
    return [get_pass(n) for n in names]


__all__ = ["Pass", "PassContext", "PassOutcome", "Skip", "REGISTRY", "DEFAULT_PASSES", "get_pass", "parse_pass_list"]
