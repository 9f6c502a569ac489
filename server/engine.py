"""The guided engine: one vLLM engine stepping a base and its ARMs, weights per request.

This module decides *what* the engine is (checks, limits, engine arguments); `server.vllm_glue` is
the only place that knows *how* vLLM does it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig

from genarm_common.errors import SetupError
from genarm_common.model_checks import FusionSetup, check_fusion_setup
from server.cpu_defaults import apply_cpu_defaults, seeded_sampling_refusal
from server.fusion import WeightError
from server.guidance import GuidanceSpec

if TYPE_CHECKING:
    from server.vllm_glue.runner import Runner

# Engine arguments that cannot work with one weight row per request and step.
UNSUPPORTED_ENGINE_ARGS = {
    "speculative_config": "speculative decoding (draft rows would not map to weight rows)",
    "pipeline_parallel_size": "pipeline parallelism (every sub-model's last layer must be local)",
    "enable_prompt_embeds": "prompt embeddings (each sub-model embeds the token ids itself)",
}


@dataclass
class GuidedModelConfig:
    """A base model and its ARMs by reward dimension, with the server's default weights."""

    base: str
    arms: dict[str, str]
    default_weights: dict[str, float] = field(default_factory=dict)
    min_weight: float = -10.0
    max_weight: float = 10.0
    served_model_name: str | None = None

    def validate(self) -> None:
        """Cheap checks (no files read); raises SetupError with one line."""
        if not self.arms:
            raise SetupError("at least one ARM is needed (--arm NAME=PATH)")
        for name in self.arms:
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise SetupError(
                    f"ARM name {name!r}: use letters, digits, '-' or '_' (it names a reward dimension)"
                )
        if not (math.isfinite(self.min_weight) and math.isfinite(self.max_weight)) or (
            self.min_weight > self.max_weight
        ):
            raise SetupError(f"bad weight range [{self.min_weight}, {self.max_weight}]")
        try:
            self.guidance().row(self.default_weights)
        except WeightError as err:
            raise SetupError(f"default {err}") from None

    @property
    def dimensions(self) -> list[str]:
        return list(self.arms)

    def guidance(self) -> GuidanceSpec:
        """Dimensions, defaults and range (what requests are checked against)."""
        defaults = [float(self.default_weights.get(d, 0.0)) for d in self.arms]
        return GuidanceSpec(self.dimensions, defaults, self.min_weight, self.max_weight)


def max_positions(path: str) -> int | None:
    config = AutoConfig.from_pretrained(path).get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def guided_engine_args(
    model: GuidedModelConfig, engine_args: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], FusionSetup]:
    """Checks everything that can be checked without loading weights; returns vLLM engine args.

    The result feeds `vllm.LLM(**args)` or `AsyncEngineArgs(**args)`.
    """
    from server.vllm_glue.attention import attention_backend_args, user_chose_attention_backend
    from server.vllm_glue.cpu_memory import cpu_free_memory_bytes
    from server.vllm_glue.parallel import apply_tensor_parallel_defaults
    from server.vllm_glue.runner import weights_processors
    from server.vllm_glue.spec import engine_overrides

    model.validate()
    args = dict(engine_args or {})
    # First: a runner that cannot run is a start-up error.
    runner = prepare_guided_runtime()
    for key, what in UNSUPPORTED_ENGINE_ARGS.items():
        value = args.get(key)
        if value not in (None, False, 1, {}):
            raise SetupError(f"{key}: {what} is not supported with GenARM guidance")
    setup = check_fusion_setup(
        model.base, model.arms, require_weights=args.get("load_format") != "dummy"
    )
    # Every sub-model must cover every position: the smallest context wins.
    limits = [m for m in (max_positions(str(f.path)) for f in [setup.base, *setup.arms.values()]) if m]
    if limits:
        limit = min(limits)
        asked = args.get("max_model_len")
        if asked is not None and int(asked) > limit:
            raise SetupError(
                f"max_model_len {asked} exceeds the {limit} positions the smallest model supports"
            )
        args.setdefault("max_model_len", limit)
    free_cpu_bytes = cpu_free_memory_bytes()
    apply_cpu_defaults(args, [setup.base.path, *(f.path for f in setup.arms.values())], free_cpu_bytes)
    apply_tensor_parallel_defaults(args)
    spec = model.guidance()
    spec.arm_paths = [str(f.path.resolve()) for f in setup.arms.values()]
    spec.base_architectures = list(AutoConfig.from_pretrained(setup.base.path).architectures or [])
    spec.vocab_size = setup.vocab_size
    overrides = dict(args.pop("hf_overrides", None) or {})
    overrides.update(engine_overrides(spec))
    if not user_chose_attention_backend(args):
        args.update(attention_backend_args())
    args.update(
        model=str(setup.base.path),
        hf_overrides=overrides,
    )
    # On V1, a processor class bound to this spec (requests are checked against this engine's own).
    refusal = seeded_sampling_refusal(args, free_cpu_bytes)
    processors = [*(args.get("logits_processors") or []), *weights_processors(spec, runner, refusal)]
    if processors:
        args["logits_processors"] = processors
    if model.served_model_name:
        args.setdefault("served_model_name", model.served_model_name)
    return args, setup


def prepare_guided_runtime() -> Runner:
    """This process runs engines on the guided engine's model runner, with its model and attention
    backend registered (also for a plain base-alone baseline on the same runner and backend).
    Returns the runner ("v1" or "v2", server.vllm_glue.runner)."""
    from server.vllm_glue.plugin import register
    from server.vllm_glue.runner import prepare_environment

    runner = prepare_environment()
    register()
    return runner


def baseline_engine_args(engine_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Engine args for a plain model on the guided engine's runner and attention backend: a fair
    base-alone figure beside the guided engine."""
    from server.vllm_glue.attention import attention_backend_args, user_chose_attention_backend

    args = dict(engine_args or {})
    prepare_guided_runtime()
    if not user_chose_attention_backend(args):
        args.update(attention_backend_args())
    return args


def weights_extra_args(model: GuidedModelConfig, weights: Mapping[str, float] | None) -> dict[str, float]:
    """SamplingParams.extra_args for one request (None: the defaults; {}: the base alone)."""
    return model.guidance().extra_args(weights)


def guided_llm(model: GuidedModelConfig, **engine_args: Any) -> Any:
    """An offline `vllm.LLM` serving the guided model (tests, benchmarks, batch jobs)."""
    from vllm import LLM

    args, _ = guided_engine_args(model, engine_args)
    return LLM(**args)
