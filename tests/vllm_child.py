"""Run a vLLM engine (plain, or guided) in a child process and return its outputs.

An in-process vLLM engine owns global distributed state, so a second engine cannot live beside
the guided one in the test process: extra engines run here.

    python -m tests.vllm_child < request.json   (last stdout line: the outputs as JSON)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def generate_in_child(
    model: str,
    prompts: list[str],
    sampling: dict[str, Any],
    engine_args: dict[str, Any],
    arms: dict[str, str] | None = None,
    weights: list[dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Plain vLLM on `model`, or the guided engine when `arms` is given (weights per prompt)."""
    request = {
        "model": model, "prompts": prompts, "sampling": sampling, "engine_args": engine_args,
        "arms": arms, "weights": weights,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.vllm_child"],
        input=json.dumps(request), capture_output=True, text=True, timeout=900, check=False,
        env={k: v for k, v in os.environ.items() if k != "GENARM_SPEC"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"child vLLM run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from vllm import LLM, SamplingParams

    from server.engine import GuidedModelConfig, guided_llm, weights_extra_args

    request = json.load(sys.stdin)
    prompts = request["prompts"]
    if request["arms"]:
        config = GuidedModelConfig(base=request["model"], arms=request["arms"])
        llm = guided_llm(config, **request["engine_args"])
        params = [
            SamplingParams(**request["sampling"], extra_args=weights_extra_args(config, w))
            for w in request["weights"]
        ]
    else:
        llm = LLM(model=request["model"], **request["engine_args"])
        params = [SamplingParams(**request["sampling"])] * len(prompts)
    result = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs or [], completion.token_ids, strict=False)]
        result.append({"token_ids": list(completion.token_ids), "text": completion.text, "logprobs": logprobs})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
