"""The GPU bench's scoring (bench/engine_gpu.py) on the CPU: what it says about an engine's tokens
must be what the fp32 reference says, and the parts of a flipped token must add up to its gap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.engine_gpu import component_margins, teacher_forced_stats
from server.reference import ReferenceGuidedGenerator, SamplingOptions

PROMPTS = ["Human: how do I bake bread?\n\nAssistant:", "Hello", "I think"]
WEIGHTS = [{"harmless": 0.5}, {"harmless": 1.0, "helpful": 2.0}, {}]


@pytest.fixture(scope="module")
def reference(tiny_family: dict[str, Path]) -> ReferenceGuidedGenerator:
    return ReferenceGuidedGenerator(
        tiny_family["llama-base"],
        {"harmless": tiny_family["llama-arm-narrow"], "helpful": tiny_family["llama-arm-padded"]},
    )


def test_scoring_finds_a_flipped_token_and_its_parts_add_up_to_its_gap(reference: ReferenceGuidedGenerator) -> None:
    prompts = [reference.encode(p) for p in PROMPTS]
    generated = reference.generate(prompts, WEIGHTS, SamplingOptions(max_tokens=10, ignore_eos=True))
    outputs = [{"token_ids": g.token_ids, "logprobs": g.logprobs} for g in generated]
    stats, divergent = teacher_forced_stats(reference, prompts, WEIGHTS, outputs)
    assert divergent == [] and stats["sequences_exact"] == len(prompts)
    assert stats["max_gap_to_reference_best"] == 0.0 and stats["max_abs_logprob_error"] < 1e-4

    # An engine that took the reference's second choice at the last token of sequence 1 (the last,
    # so no later token sees another context).
    sequence, weights = 1, WEIGHTS[1]
    tokens = outputs[sequence]["token_ids"]
    fused = reference.teacher_forced(prompts[sequence], tokens, weights)
    position = len(tokens) - 1
    second = int(fused[position].topk(2).indices[1])
    gap = float(fused[position].max() - fused[position, second])
    flipped = [dict(o) for o in outputs]
    flipped[sequence] = {"token_ids": tokens[:-1] + [second],
                         "logprobs": outputs[sequence]["logprobs"][:-1] + [float(fused[position, second]) + 0.25]}
    stats, divergent = teacher_forced_stats(reference, prompts, WEIGHTS, flipped)
    assert [(t["sequence"], t["position"], t["chosen"]) for t in divergent] == [(sequence, position, second)]
    total = 1 + sum(abs(w) for w in weights.values())
    assert stats["max_gap_per_unit_weight"] == pytest.approx(gap / total, abs=1e-5)
    assert stats["max_abs_logprob_error"] == pytest.approx(0.25, abs=1e-4)
    assert stats["max_abs_logprob_error_per_unit_weight"] == pytest.approx(0.25 / total, abs=1e-4)

    [parts] = component_margins(reference, prompts, flipped, divergent)
    # The fusion's normalisers cancel in a difference of two tokens' fused log-probs.
    recombined = parts["base_margin"] + sum(w * parts["arm_margins"][d] for d, w in weights.items())
    assert recombined == pytest.approx(gap, abs=1e-4)
    assert torch.isfinite(torch.tensor([parts["base_margin"], *parts["arm_margins"].values()])).all()
