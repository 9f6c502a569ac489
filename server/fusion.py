"""The GenARM step on logits: fuse a base model with K autoregressive reward models (ARMs).

    log p(y) = log_softmax(z_base) + sum_k w[b, k] * log_softmax(z_arm_k)   (renormalised)

Every decoding path of the project (the transformers reference and the vLLM engine) calls
`fused_logprobs`, so there is one definition of the formula. It works on the tokenizer's
length `vocab_size`: rows past it (embedding-table padding, which differs between models that
share one tokenizer) are dropped before the softmax and come back as -inf, so they are never
sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class WeightError(ValueError):
    """A guidance weight is not a finite number, out of range, or names no known dimension."""

    def __init__(self, message: str, dimension: str | None = None) -> None:
        super().__init__(message)
        self.dimension = dimension


def validate_weight_value(name: str, value: object) -> float:
    """One weight, as a float; refuses bools, non-numbers and non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightError(f"weight {name!r} must be a number, got {type(value).__name__}", name)
    value = float(value)
    if not math.isfinite(value):
        raise WeightError(f"weight {name!r} must be finite, got {value}", name)
    return value


def fused_logprobs(
    base_logits: torch.Tensor,
    arm_logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    vocab_size: int,
    out_width: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Fused, renormalised log-probabilities, float32, shape [B, out_width or vocab_size].

    base_logits: [B, >= vocab_size]; arm_logits[k]: [B, >= vocab_size] (any padding);
    weights: [B, K], row b holds request b's weight per ARM (0 = that ARM has no effect).
    Columns from vocab_size to out_width are -inf (so a caller that must return the base's
    padded width, like vLLM's sampler, never samples a padding row).
    `validate=False` skips the finiteness check (one device sync) for callers that validated
    the weights when the request arrived.
    """
    if weights.dim() != 2 or weights.shape != (base_logits.shape[0], len(arm_logits)):
        raise WeightError(
            f"weights must have shape [batch={base_logits.shape[0]}, arms={len(arm_logits)}], "
            f"got {list(weights.shape)}"
        )
    if validate and not bool(torch.isfinite(weights).all()):
        raise WeightError("guidance weights must be finite")
    for logits in (base_logits, *arm_logits):
        if logits.shape[-1] < vocab_size:
            raise ValueError(
                f"logits have {logits.shape[-1]} columns, fewer than the tokenizer's {vocab_size}"
            )
    fused = torch.log_softmax(base_logits[:, :vocab_size].float(), dim=-1)
    weights = weights.to(device=fused.device, dtype=torch.float32)
    for k, logits in enumerate(arm_logits):
        arm = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
        # where() rather than a product: 0 * (-inf) would be NaN for a token an ARM rules out.
        w = weights[:, k : k + 1]
        fused = fused + torch.where(w == 0, torch.zeros_like(arm), w * arm)
    fused = torch.log_softmax(fused, dim=-1)
    if out_width is not None and out_width > vocab_size:
        pad = fused.new_full((fused.shape[0], out_width - vocab_size), float("-inf"))
        fused = torch.cat([fused, pad], dim=-1)
    return fused


def sample_next_tokens(
    logprobs: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Sample one token per row from fused log-probs, with per-row sampling parameters.

    temperature 0 means greedy (argmax); top_k <= 0 means no top-k; top_p 1 means no top-p.
    Same semantics as vLLM's sampler (temperature first, then top-k, then top-p), so the
    reference decoder and the engine sample the same distribution.
    """
    greedy = logprobs.argmax(dim=-1)
    rows = logprobs.shape[0]
    out = greedy.clone()
    for b in range(rows):
        t = float(temperature[b])
        if t <= 0.0:
            continue
        scaled = logprobs[b].float() / t
        k = int(top_k[b])
        if 0 < k < scaled.shape[-1]:
            kth = torch.topk(scaled, k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        p = float(top_p[b])
        if p < 1.0:
            sorted_vals, order = torch.sort(scaled, descending=True)
            probs = torch.softmax(sorted_vals, dim=-1)
            # Drop a token once the mass before it already reaches p (always keep the first).
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p
            sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_vals)
        probs = torch.softmax(scaled, dim=-1)
        gen = generators[b] if generators is not None else None
        out[b] = torch.multinomial(probs, 1, generator=gen)[0]
    return out
