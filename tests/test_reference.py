"""The transformers reference guided decoder: the oracle every fast path is checked against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from genarm_common.errors import SetupError
from genarm_common.model_checks import check_fusion_setup
from server.fusion import WeightError
from server.reference import ReferenceGuidedGenerator, SamplingOptions

PROMPTS = [
    "Human: how do I bake bread?\n\nAssistant:",
    "Hello",
    "Human: What is the capital of France? Please answer briefly and politely.\n\nAssistant: The",
    "I think",
]


@pytest.fixture(scope="module")
def llama(tiny_family: dict[str, Path]) -> ReferenceGuidedGenerator:
    return ReferenceGuidedGenerator(
        tiny_family["llama-base"],
        {"harmless": tiny_family["llama-arm-narrow"], "helpful": tiny_family["llama-arm-padded"]},
    )


def test_zero_weights_give_the_base_models_greedy_output(llama: ReferenceGuidedGenerator) -> None:
    base = AutoModelForCausalLM.from_pretrained(llama.setup.base.path, dtype=torch.float32).eval()
    guided = llama.generate(PROMPTS, [{}] * len(PROMPTS), SamplingOptions(max_tokens=24))
    for prompt, result in zip(PROMPTS, guided, strict=True):
        ids = torch.tensor([llama.encode(prompt)])
        plain = base.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
        assert result.token_ids == plain[0, ids.shape[1] :].tolist()


def test_huge_weight_follows_that_arms_greedy_choice(llama: ReferenceGuidedGenerator) -> None:
    for dim, folder in llama.setup.arms.items():
        out = llama.generate(PROMPTS, [{dim: 1e4}] * len(PROMPTS), SamplingOptions(max_tokens=12, ignore_eos=True))
        arm = AutoModelForCausalLM.from_pretrained(folder.path, dtype=torch.float32).eval()
        for prompt, result in zip(PROMPTS, out, strict=True):
            ids = llama.encode(prompt)
            for token in result.token_ids:
                with torch.inference_mode():
                    logits = arm(torch.tensor([ids])).logits[0, -1, : llama.vocab_size]
                assert token == int(logits.argmax())
                ids.append(token)


def test_kv_cache_matches_full_recompute(llama: ReferenceGuidedGenerator) -> None:
    weights = [{"harmless": 0.5}, {"helpful": 2.0}, {"harmless": 1.0, "helpful": 1.0}, {}]
    options = SamplingOptions(max_tokens=20, ignore_eos=True)
    cached = llama.generate(PROMPTS, weights, options)
    naive = llama.generate(PROMPTS, weights, options, use_kv_cache=False)
    for c, n in zip(cached, naive, strict=True):
        assert c.token_ids == n.token_ids
        assert max(abs(a - b) for a, b in zip(c.logprobs, n.logprobs)) < 1e-4


def test_batched_rows_equal_single_prompt_runs(llama: ReferenceGuidedGenerator) -> None:
    weights = [{"harmless": 2.0}, {}, {"helpful": 0.5}, {"harmless": 1.0, "helpful": 3.0}]
    batched = llama.generate(PROMPTS, weights, SamplingOptions(max_tokens=16, ignore_eos=True))
    for prompt, w, result in zip(PROMPTS, weights, batched, strict=True):
        single = llama.generate([prompt], [w], SamplingOptions(max_tokens=16, ignore_eos=True))[0]
        assert single.token_ids == result.token_ids


def test_weights_change_the_output(llama: ReferenceGuidedGenerator) -> None:
    options = SamplingOptions(max_tokens=16, ignore_eos=True)
    plain = llama.generate(PROMPTS, [{}] * 4, options)
    guided = llama.generate(PROMPTS, [{"harmless": 3.0}] * 4, options)
    assert any(p.token_ids != g.token_ids for p, g in zip(plain, guided, strict=True))


def test_padded_vocabulary_is_never_sampled(tiny_family: dict[str, Path]) -> None:
    # qwen2-base has a padded embedding table; its padding rows are random, often large.
    gen = ReferenceGuidedGenerator(tiny_family["qwen2-base"], {"helpful": tiny_family["qwen2-arm"]})
    assert gen.setup.base.embedding_rows > gen.vocab_size
    out = gen.generate(
        PROMPTS * 4,
        [{"helpful": 1.0}] * 16,
        SamplingOptions(max_tokens=24, temperature=2.0, seed=7, ignore_eos=True),
    )
    assert all(t < gen.vocab_size for r in out for t in r.token_ids)


def test_stops_per_row(llama: ReferenceGuidedGenerator) -> None:
    free = llama.generate(PROMPTS[:2], [{}, {}], SamplingOptions(max_tokens=24, ignore_eos=True))
    stop = free[0].text[5:8]  # a string the first row is known to produce
    assert stop
    out = llama.generate(
        PROMPTS[:2],
        [{}, {}],
        [SamplingOptions(max_tokens=24, stop=[stop]), SamplingOptions(max_tokens=5)],
    )
    assert out[0].finish_reason == "stop" and out[0].text == free[0].text[: free[0].text.find(stop)]
    assert out[1].finish_reason == "length" and len(out[1].token_ids) == 5
    assert out[1].token_ids == free[1].token_ids[:5]


def test_eos_ends_only_its_row(llama: ReferenceGuidedGenerator) -> None:
    eos = llama.tokenizer.eos_token_id
    free = llama.generate(PROMPTS, [{}] * 4, SamplingOptions(max_tokens=40, ignore_eos=True))
    stopped = llama.generate(PROMPTS, [{}] * 4, SamplingOptions(max_tokens=40))
    assert any(eos in r.token_ids for r in free), "the tiny base should emit EOS within 40 tokens"
    for f, s in zip(free, stopped, strict=True):
        if eos in f.token_ids:
            cut = f.token_ids.index(eos) + 1
            assert s.token_ids == f.token_ids[:cut] and s.finish_reason == "stop"
        else:
            assert s.token_ids == f.token_ids and s.finish_reason == "length"


def test_seeded_sampling_is_reproducible(llama: ReferenceGuidedGenerator) -> None:
    options = SamplingOptions(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=3, ignore_eos=True)
    a = llama.generate(PROMPTS, [{"harmless": 1.0}] * 4, options)
    b = llama.generate(PROMPTS, [{"harmless": 1.0}] * 4, options)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_bad_weights_are_refused(llama: ReferenceGuidedGenerator) -> None:
    for bad in ({"harmless": float("nan")}, {"helpful": float("inf")}, {"funny": 1.0}):
        with pytest.raises(WeightError):
            llama.generate(["Hi"], [bad], SamplingOptions(max_tokens=2))


def test_a_different_tokenizer_is_refused_with_the_difference_named(
    tiny_family: dict[str, Path], foreign_arm: Path
) -> None:
    with pytest.raises(SetupError) as err:
        check_fusion_setup(tiny_family["llama-base"], {"harmless": foreign_arm})
    message = str(err.value)
    assert "'harmless'" in message and str(foreign_arm) in message
    assert "token id" in message and "\n" not in message


def test_missing_files_are_refused(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="does not exist"):
        check_fusion_setup(tmp_path / "nowhere", {"harmless": tiny_family["llama-arm-narrow"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match="no config.json"):
        check_fusion_setup(tiny_family["llama-base"], {"harmless": tmp_path / "empty"})
    with pytest.raises(SetupError, match="at least one ARM"):
        check_fusion_setup(tiny_family["llama-base"], {})


def test_every_start_up_problem_gets_its_own_line(tiny_family: dict[str, Path], foreign_arm: Path, tmp_path: Path) -> None:
    with pytest.raises(SetupError) as err:
        check_fusion_setup(tiny_family["llama-base"], {"a": tmp_path / "missing-a", "b": tmp_path / "missing-b"})
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "'a'" in lines[0] and "'b'" in lines[1]


SCORING_WEIGHTS = [{"harmless": 0.5}, {"harmless": 1.0, "helpful": 2.0}, {}, {"helpful": 0.5}]


def test_gpu_bench_scoring_finds_a_flipped_token_and_its_parts_add_up_to_its_gap(llama: ReferenceGuidedGenerator) -> None:
    """bench/engine_gpu.py scores GPU engines' tokens against this reference: what it reports about a
    token must be what the reference says, and a flipped token's parts must add up to its gap."""
    from bench.engine_gpu import component_margins, teacher_forced_stats

    prompts = [llama.encode(p) for p in PROMPTS]
    generated = llama.generate(prompts, SCORING_WEIGHTS, SamplingOptions(max_tokens=10, ignore_eos=True))
    outputs = [{"token_ids": g.token_ids, "logprobs": g.logprobs} for g in generated]
    stats, divergent = teacher_forced_stats(llama, prompts, SCORING_WEIGHTS, outputs)
    assert divergent == [] and stats["sequences_exact"] == len(prompts)
    assert stats["max_gap_to_reference_best"] == 0.0 and stats["max_abs_logprob_error"] < 1e-4

    # An engine that took the reference's second choice at the last token of sequence 1 (the last,
    # so no later token sees another context).
    sequence, weights = 1, SCORING_WEIGHTS[1]
    tokens = outputs[sequence]["token_ids"]
    fused = llama.teacher_forced(prompts[sequence], tokens, weights)
    position = len(tokens) - 1
    second = int(fused[position].topk(2).indices[1])
    gap = float(fused[position].max() - fused[position, second])
    flipped = [dict(o) for o in outputs]
    flipped[sequence] = {"token_ids": tokens[:-1] + [second],
                         "logprobs": outputs[sequence]["logprobs"][:-1] + [float(fused[position, second]) + 0.25]}
    stats, divergent = teacher_forced_stats(llama, prompts, SCORING_WEIGHTS, flipped)
    assert [(t["sequence"], t["position"], t["chosen"]) for t in divergent] == [(sequence, position, second)]
    total = 1 + sum(abs(w) for w in weights.values())
    assert stats["max_gap_per_unit_weight"] == pytest.approx(gap / total, abs=1e-5)
    assert stats["max_abs_logprob_error"] == pytest.approx(0.25, abs=1e-4)
    assert stats["max_abs_logprob_error_per_unit_weight"] == pytest.approx(0.25 / total, abs=1e-4)

    [parts] = component_margins(llama, prompts, flipped, divergent)
    # The fusion's normalisers cancel in a difference of two tokens' fused log-probs.
    recombined = parts["base_margin"] + sum(w * parts["arm_margins"][d] for d, w in weights.items())
    assert recombined == pytest.approx(gap, abs=1e-4)
    assert torch.isfinite(torch.tensor([parts["base_margin"], *parts["arm_margins"].values()])).all()
