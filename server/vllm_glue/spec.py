"""How the guidance spec rides in vLLM's model config: `hf_overrides` put it in the base's
hf_config, so every vLLM process reads the engine's own spec from its VllmConfig."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from server.guidance import GuidanceSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from vllm.config import VllmConfig

ARCHITECTURE = "GenARMForCausalLM"
HF_CONFIG_KEY = "genarm"  # where the guidance spec rides in the base's (overridden) hf_config


def engine_overrides(spec: GuidanceSpec) -> dict[str, Any]:
    """hf_overrides that turn the base folder into the composite GenARM model."""
    return {"architectures": [ARCHITECTURE], HF_CONFIG_KEY: asdict(spec)}


def spec_from_hf_config(hf_config: PretrainedConfig) -> GuidanceSpec | None:
    data = getattr(hf_config, HF_CONFIG_KEY, None)
    return GuidanceSpec.from_dict(data) if data else None


def engine_spec(vllm_config: VllmConfig) -> GuidanceSpec | None:
    """The spec of the engine `vllm_config` describes (None: not a guided engine)."""
    return spec_from_hf_config(vllm_config.model_config.hf_config)
