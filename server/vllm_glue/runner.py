"""The model runner the guided engine needs, chosen before vLLM reads its environment."""

from __future__ import annotations

import os

from genarm_common.errors import SetupError


def prepare_environment() -> None:
    """Select vLLM's V1 model runner (the per-request weights are a V1 logits processor).

    vLLM >= 0.26 may pick Model Runner V2, which does not take V1 logits processors (0.26 falls
    back by itself; 0.32 on GPU refuses them).
    """
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lower() in ("1", "true", "yes"):
        raise SetupError(
            "GenARM guidance needs vLLM's V1 model runner (it keeps per-request weights in a "
            "V1 logits processor): unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
