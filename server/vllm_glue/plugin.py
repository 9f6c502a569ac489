"""The `vllm.general_plugins` entry point: registers the composite model and the attention backend
in every vLLM process, before any model loads."""

from __future__ import annotations

from server.vllm_glue import attention
from server.vllm_glue.spec import ARCHITECTURE

MODEL_CLASS = f"server.vllm_glue.model:{ARCHITECTURE}"  # imported by vLLM only when the engine loads it


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    # Resolved by name only when an engine selects it (see attention.attention_backend_args).
    register_backend(AttentionBackendEnum.CUSTOM, attention.BACKEND_QUALNAME)
