"""Free memory on a CPU-only platform, as vLLM's CPU worker counts it (server.cpu_defaults sizes the
KV cache from it)."""

from __future__ import annotations


def cpu_free_memory_bytes() -> int | None:
    """Memory free for the engine on a CPU-only platform: the first allowed core's NUMA node,
    clamped by a cgroup limit; None on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    return int(get_memory_node_info(get_allowed_cpu_list()[0].numa_node).available_memory)
