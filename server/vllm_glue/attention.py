"""An attention backend for sub-models of other head geometry on CUDA: FlashAttention whose metadata
builder plans with each KV-cache group's own head counts and head size (vLLM 0.26).

vLLM 0.26's FlashAttention metadata builder plans FA3's scheduler metadata with the *model-wide*
head counts and head size, so ARM layers of another geometry crash ("scheduler_metadata must have
shape (metadata_size)"); vLLM fixed this upstream (PR #53002, in 0.29). Other platforms (the CPU
build) keep their default backend.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import AttentionSpec

BACKEND_NAME = "GroupGeometryFlashAttentionBackend"
BACKEND_QUALNAME = f"{__name__}.{BACKEND_NAME}"  # how vLLM's registry names it
_backend_class: type | None = None


def attention_backend_args() -> dict[str, Any]:
    """Engine args selecting the backend (registered by server.vllm_glue.plugin) on CUDA."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return {"attention_backend": "CUSTOM"}
    return {}


def user_chose_attention_backend(args: Mapping[str, Any] | Namespace) -> bool:
    """Whether engine args (a dict or vLLM's parsed CLI namespace) already pick a backend."""
    get = args.get if isinstance(args, Mapping) else lambda key: getattr(args, key, None)
    config = get("attention_config")
    chosen = config.get("backend") if isinstance(config, dict) else getattr(config, "backend", None)
    return get("attention_backend") is not None or chosen is not None


def group_geometry_flash_attention_backend() -> type:
    """The backend class, built on first use (importing this module never needs CUDA kernels)."""
    global _backend_class
    if _backend_class is not None:
        return _backend_class
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionMetadataBuilder,
    )
    from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

    class GroupGeometryFlashAttentionBuilder(FlashAttentionMetadataBuilder):
        # Metadata planned for one group's head counts must not be reused by another group.
        supports_update_block_table = False

        def __init__(
            self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
        ) -> None:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            heads = get_num_attention_heads_from_layers(vllm_config, layer_names)
            self.num_heads_q = heads or self.num_heads_q
            self.num_heads_kv = kv_cache_spec.num_kv_heads
            self.headdim = kv_cache_spec.head_size

    class GroupGeometryFlashAttentionBackend(FlashAttentionBackend):
        # get_name() stays "FLASH_ATTN": vLLM maps layers to backends by that name.
        @staticmethod
        def get_builder_cls() -> type:
            return GroupGeometryFlashAttentionBuilder

    # vLLM names backends by module + qualname and imports them again elsewhere: give the
    # classes module-level names, which this module's __getattr__ resolves.
    for cls in (GroupGeometryFlashAttentionBuilder, GroupGeometryFlashAttentionBackend):
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    _backend_class = GroupGeometryFlashAttentionBackend
    return _backend_class


def __getattr__(name: str) -> Any:
    # vLLM resolves the registered backend by its qualified name: build it on first use.
    if name == BACKEND_NAME:
        return group_geometry_flash_attention_backend()
    if name == "GroupGeometryFlashAttentionBuilder":
        return group_geometry_flash_attention_backend().get_builder_cls()
    raise AttributeError(name)
