"""How many tokens each block keeps: from an overall FLOP target or a per-block list.

A block at n tokens costs about ``a n + c n^2`` FLOPs: ``a`` = 2 x its projection and MLP weights
(every token goes through them), ``c`` = 4 x hidden (QK^T and attention x V). Tokens can only go
between blocks, after the first block's attention has been seen, so block 0 always runs at full
count. The FLOP schedule removes the same number r of tokens before each later block (ToMe's
constant schedule), the smallest r that meets the target; ToMe merges at most half of the
unprotected tokens at once.
"""

from __future__ import annotations

from effc.errors import EffcError


def block_flops(n: int, per_token: float, hidden: int) -> float:
    return per_token * n + 4.0 * hidden * n * n


def from_target(tokens: int, blocks: int, keep: float, per_token: float, hidden: int, protect: int,
                halve: bool) -> list[int]:
    """Token counts per block meeting ``keep`` x the blocks' FLOPs (as close as the limits allow)."""
    full = blocks * block_flops(tokens, per_token, hidden)
    best = [tokens] * blocks
    for r in range(0, tokens):
        counts = _constant(tokens, blocks, r, protect, halve)
        best = counts
        if sum(block_flops(n, per_token, hidden) for n in counts) <= keep * full:
            break
    return best


def _constant(tokens: int, blocks: int, r: int, protect: int, halve: bool) -> list[int]:
    counts = [tokens]
    for _ in range(blocks - 1):
        n = counts[-1]
        limit = (n - protect) // 2 if halve else n - protect - 1
        counts.append(n - max(0, min(r, limit)))
    return counts


def from_list(text: str, tokens: int, blocks: int, protect: int, halve: bool) -> list[int]:
    """Per-block token counts from "1,0.8,0.6" (fractions of the full count) or "65,50,40" (counts)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EffcError(f"prune-tokens.schedule={text!r}: expected comma-separated numbers") from None
    if len(values) != blocks:
        raise EffcError(f"prune-tokens.schedule has {len(values)} entries, the model has {blocks} blocks")
    counts = [int(round(v * tokens)) if v <= 1.0 else int(v) for v in values]
    if counts[0] != tokens:
        raise EffcError(f"prune-tokens.schedule: block 0 must keep all {tokens} tokens (no attention is seen "
                        "before it)")
    for before, after in zip(counts, counts[1:]):
        low = before - (before - protect) // 2 if halve else protect + 1
        if after > before or after < low:
            raise EffcError(f"prune-tokens.schedule: {before} -> {after} tokens is not allowed (counts must not "
                            f"grow and stay >= {low}{' (ToMe merges at most half)' if halve else ''})")
    return counts
