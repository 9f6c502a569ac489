"""The one way the project runs a vLLM engine (plain, guided, or plain on the guided engine's runner)
in a child process and gets JSON back: tests, the quality and gold experiments, the engine and
multi-GPU benchmarks.

An in-process vLLM engine owns global state (one per process), and a child's GPU memory is returned
when it exits, so every engine runs in its own child:

    python -m bench.vllm_worker JOB.json RESULT.json

JOB: {"engine": {"model": PATH, "arms": {name: PATH} | null, "engine_args": {...},
                 "baseline": bool (plain model on the guided engine's runner and attention backend)},
      "warmup": bool (default true),
      "tasks": [{"name", "prompt_ids": [[int]] | "prompts": [str], "n", "temperature", "seed", "max_tokens",
                 "ignore_eos", "weights": {dim: w} | null, "weights_per_prompt": [{dim: w}] | null,
                 "logprobs": bool}]}
Prompt b of a task samples with seed `seed + SEED_STRIDE * b` (vLLM gives the i-th of n samples
seed + i, so strides of SEED_STRIDE keep every sample's seed distinct). With the warm-up on, every
distinct prompt is prefilled once first when prefix caching is on, and a few tokens are decoded, all
untimed, so timings are of decoding with a warm prompt cache, the same for every task. Each task is
one timed `LLM.generate` call; RESULT holds, per task, the samples (token ids, text, finish reason,
and the sampled tokens' log-probs if asked), the wall time and the number of generated tokens, plus
the engine's start-up time, the model runner it chose ("v1" or "v2"), the device and vLLM's version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SEED_STRIDE = 100
ROOT = Path(__file__).resolve().parents[1]


def run_engine_job(job: dict[str, Any], workdir: Path, name: str, nice: int = 0, timeout: float = 7200,
                   threads: int | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `job` in a child process (optionally niced); returns its result (cached by file).

    The child runs vLLM's engine in-process on a 1 GiB CPU KV cache unless `env` (applied last)
    or the environment says otherwise. Raises RuntimeError with the log's tail when it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / f"{name}.job.json", workdir / f"{name}.result.json"
    if result_file.is_file() and job_file.is_file() and json.loads(job_file.read_text()) == job:
        return json.loads(result_file.read_text())  # same job already done: reuse
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    child_env = dict(os.environ)
    child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    child_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    if threads:
        child_env["OMP_NUM_THREADS"] = str(threads)  # vLLM's CPU worker keeps this many torch threads
    child_env.update(env or {})
    cmd = [sys.executable, "-m", "bench.vllm_worker", str(job_file), str(result_file)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=child_env, cwd=ROOT)
    if done.returncode != 0 or not result_file.is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"vLLM worker {name} failed (rc {done.returncode}); log {log}:\n{tail}")
    return json.loads(result_file.read_text())


def make_engine(engine: dict[str, Any]) -> tuple[Any, Any]:
    """The engine a job names, and its GuidedModelConfig (None for a plain engine)."""
    from vllm import LLM

    from server.engine import GuidedModelConfig, baseline_engine_args, guided_llm

    engine_args = dict(engine.get("engine_args") or {})
    if engine.get("arms"):
        config = GuidedModelConfig(base=engine["model"], arms=engine["arms"])
        return guided_llm(config, **engine_args), config
    if engine.get("baseline"):
        engine_args = baseline_engine_args(engine_args)
    return LLM(model=engine["model"], **engine_args), None


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    from vllm import SamplingParams

    from server.engine import weights_extra_args

    engine = job["engine"]
    started = time.monotonic()
    llm, config = make_engine(engine)
    startup = time.monotonic() - started
    runner = model_runner(llm)
    tasks = job["tasks"]
    t0 = time.monotonic()
    if job.get("warmup", True) and tasks:
        warm_up(llm, config, tasks, bool((engine.get("engine_args") or {}).get("enable_prefix_caching")))
    warmup = time.monotonic() - t0
    results = []
    for task in tasks:
        prompts = prompts_of(task)
        rows = task.get("weights_per_prompt") or [task.get("weights") or {}] * len(prompts)
        if config is None and any(rows):
            raise ValueError(f"task {task['name']}: weights need a guided engine")
        params = [
            SamplingParams(
                n=task.get("n", 1), temperature=task["temperature"], max_tokens=task["max_tokens"],
                seed=None if task.get("seed") is None else task["seed"] + SEED_STRIDE * b,
                logprobs=0 if task.get("logprobs") else None, ignore_eos=bool(task.get("ignore_eos")),
                extra_args=None if config is None else weights_extra_args(config, rows[b]),
            )
            for b in range(len(prompts))
        ]
        t0 = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.monotonic() - t0
        samples = [[sample_record(c) for c in out.outputs] for out in outputs]
        tokens = sum(len(s["token_ids"]) for per in samples for s in per)
        results.append({"name": task["name"], "samples": samples, "wall_s": wall, "generated_tokens": tokens,
                        "tokens_per_s": tokens / wall if wall > 0 else None})
        print(f"[vllm_worker] {task['name']}: {tokens} tokens in {wall:.1f} s", flush=True)
    Path(result_path).write_text(json.dumps({"startup_s": startup, "warmup_prefill_s": warmup, "model_runner": runner,
                                             "async_scheduling": async_scheduling(llm), **machine(), "tasks": results}))


def model_runner(llm: Any) -> str:
    """Which model runner the engine chose: "v2" (Model Runner V2) or "v1". The front end's config
    decides it from the same environment as the engine's processes."""
    config = llm.llm_engine.vllm_config
    return "v2" if getattr(config, "use_v2_model_runner", False) else "v1"


def async_scheduling(llm: Any) -> bool:
    """Whether vLLM scheduled asynchronously (it decides at start-up; None never survives it)."""
    return bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling)


def machine() -> dict[str, str]:
    """The device and vLLM version this engine ran on."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        vllm_version = version("vllm")
    except PackageNotFoundError:
        vllm_version = version("vllm-cpu")
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "vllm": vllm_version}


def prompts_of(task: dict[str, Any]) -> list[Any]:
    from vllm.inputs import TokensPrompt

    if "prompts" in task:
        return list(task["prompts"])
    return [TokensPrompt(prompt_token_ids=list(ids)) for ids in task["prompt_ids"]]


def warm_up(llm: Any, config: Any, tasks: list[dict[str, Any]], prefix_caching: bool) -> None:
    """Untimed: with prefix caching, prefill every distinct prompt once (1 greedy token), so every
    timed task finds its prompts in the cache and no task pays the prefill for the others; then
    decode a few sampled tokens with log-probs over task 1's batch, so first-call set-up is not timed in it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from server.engine import weights_extra_args

    base_alone = None if config is None else weights_extra_args(config, {})
    if prefix_caching:
        warm = sorted({tuple(ids) for task in tasks for ids in task.get("prompt_ids", [])})
        if warm:
            llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in warm],
                         SamplingParams(max_tokens=1, temperature=0.0, extra_args=base_alone), use_tqdm=False)
    # The first task's whole batch, not a slice of 16: on an H200 each engine's first timed task ran
    # at 0.56-0.67x the speed of the next ones after a 16-prompt warm-up (weak-to-strong run, eager
    # engines); kernels specialised on the batch size compiling inside it are the likely cause.
    first = prompts_of(tasks[0])
    if first:
        llm.generate(first, SamplingParams(n=tasks[0].get("n", 1), max_tokens=4, temperature=1.0, seed=0, logprobs=0,
                                           extra_args=base_alone), use_tqdm=False)


def sample_record(completion: Any) -> dict[str, Any]:
    record = {"token_ids": list(completion.token_ids), "text": completion.text,
              "finish_reason": completion.finish_reason}
    if completion.logprobs is not None:  # the sampled token's log-prob (the fused one in a guided engine)
        record["logprobs"] = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids,
                                                                  strict=True)]
    return record


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
