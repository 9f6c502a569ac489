"""One vLLM engine (plain, or the guided GenARM engine) in a child process, running a list of tasks.

An in-process vLLM engine owns global state (one per process), so every engine of the experiment
runs in its own child:

    python -m bench.quality.vllm_worker JOB.json RESULT.json

JOB: {"engine": {"model": PATH, "arms": {name: PATH} | null, "engine_args": {...}},
      "tasks": [{"name", "prompt_ids": [[int]], "n", "temperature", "seed", "max_tokens",
                 "weights": {dim: w} | null, "weights_per_prompt": [{dim: w}] | null, "logprobs": bool}]}
Prompt b of a task samples with seed `seed + SEED_STRIDE * b` (vLLM gives the i-th of n samples
seed + i, so strides of SEED_STRIDE keep every sample's seed distinct). With prefix caching on, every
distinct prompt is prefilled once first (untimed), so timings are of decoding with a warm prompt
cache, the same for every task. Each task is one timed `LLM.generate` call; RESULT holds, per task,
the samples (token ids, text, finish reason), the wall time and the number of generated tokens, plus
the engine's start-up time.
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
ROOT = Path(__file__).resolve().parents[2]


def run_engine_job(job: dict[str, Any], workdir: Path, name: str, nice: int = 0, timeout: float = 7200,
                   threads: int | None = None) -> dict[str, Any]:
    """Run `job` in a child process (optionally niced); returns its result (cached by file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / f"{name}.job.json", workdir / f"{name}.result.json"
    if result_file.is_file() and job_file.is_file() and json.loads(job_file.read_text()) == job:
        return json.loads(result_file.read_text())  # same job already done: reuse
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "GENARM_SPEC"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # vLLM's CPU worker keeps this many torch threads
    cmd = [sys.executable, "-m", "bench.quality.vllm_worker", str(job_file), str(result_file)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0 or not result_file.is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"vLLM worker {name} failed (rc {done.returncode}); log {log}:\n{tail}")
    return json.loads(result_file.read_text())


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = job["engine"]
    started = time.monotonic()
    config = None
    if engine.get("arms"):
        from server.engine import GuidedModelConfig, guided_llm, weights_extra_args

        config = GuidedModelConfig(base=engine["model"], arms=engine["arms"])
        llm = guided_llm(config, **engine["engine_args"])
    else:
        llm = LLM(model=engine["model"], **engine["engine_args"])
    startup = time.monotonic() - started
    # Warm-up, untimed: prefill every distinct prompt once (1 greedy token), so that every timed task
    # finds its prompts in the prefix cache and no task pays the prefill for the others.
    warm = {tuple(ids) for task in job["tasks"] for ids in task["prompt_ids"]}
    t0 = time.monotonic()
    if warm and engine.get("engine_args", {}).get("enable_prefix_caching"):
        llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in sorted(warm)],
                     SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra_default(config)), use_tqdm=False)
    # ... and decode a few sampled tokens with log-probs, so first-call set-up is not timed in task 1.
    first = job["tasks"][0]["prompt_ids"][:16] if job["tasks"] else []
    if first:
        llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in first],
                     SamplingParams(max_tokens=8, temperature=1.0, seed=0, logprobs=0,
                                    extra_args=extra_default(config)), use_tqdm=False)
    warmup = time.monotonic() - t0
    results = []
    for task in job["tasks"]:
        rows = task.get("weights_per_prompt") or [task.get("weights") or {}] * len(task["prompt_ids"])
        if config is None and any(rows):
            raise ValueError(f"task {task['name']}: weights need a guided engine")
        extras = [None if config is None else weights_extra_args(config, row) for row in rows]
        params = [
            SamplingParams(
                n=task.get("n", 1), temperature=task["temperature"], max_tokens=task["max_tokens"],
                seed=None if task.get("seed") is None else task["seed"] + SEED_STRIDE * b,
                logprobs=0 if task.get("logprobs") else None,
                extra_args=extras[b],
            )
            for b in range(len(task["prompt_ids"]))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in task["prompt_ids"]]
        t0 = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.monotonic() - t0
        samples = [[sample_record(c) for c in out.outputs] for out in outputs]
        tokens = sum(len(s["token_ids"]) for per in samples for s in per)
        results.append({"name": task["name"], "samples": samples, "wall_s": wall, "generated_tokens": tokens,
                        "tokens_per_s": tokens / wall if wall > 0 else None})
        print(f"[vllm_worker] {task['name']}: {tokens} tokens in {wall:.1f} s", flush=True)
    Path(result_path).write_text(json.dumps({"startup_s": startup, "warmup_prefill_s": warmup, "tasks": results}))


def sample_record(completion: Any) -> dict[str, Any]:
    record = {"token_ids": list(completion.token_ids), "text": completion.text,
              "finish_reason": completion.finish_reason}
    if completion.logprobs is not None:  # the sampled token's log-prob (the fused one in a guided engine)
        record["logprobs"] = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids,
                                                                  strict=True)]
    return record


def extra_default(config: Any) -> dict[str, float] | None:
    if config is None:
        return None
    from server.engine import weights_extra_args

    return weights_extra_args(config, {})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
