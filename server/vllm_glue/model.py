"""The composite model vLLM serves: a base causal LM and K ARMs stepped together, logits fused.

- Built from the base folder with `hf_overrides` (server.vllm_glue.spec) that set `architectures`
  to this class and carry the guidance spec. It builds vLLM's own model class for the base and for
  each ARM, so every attention layer of every sub-model gets paged KV cache (one KV-cache group,
  per-layer specs): continuous batching, chunked prefill and prefix caching cover them together.
- `forward` returns the sub-models' last hidden states concatenated on the last dimension, so the
  runner's own row selection (`logits_indices`) picks each request's row for every model.
- `compute_logits` fuses in float32 with `server.fusion.fused_logprobs`, so the log-probs vLLM
  reports are those of the fused distribution; the weights are the step's rows `step_weights`
  returns (server.vllm_glue.weights), written by the V1 logits processor on the V1 runner or by
  the model state `get_model_state_cls` names on Model Runner V2 (each runner uses its own hook
  and ignores the other).
- The ARMs' weights are secondary weight sources of vLLM's own loader, so `--load-format` and
  friends apply to them as to the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from server.fusion import fused_logprobs
from server.vllm_glue.spec import ARCHITECTURE, HF_CONFIG_KEY, engine_spec
from server.vllm_glue.weights import step_weights

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.sequence import IntermediateTensors


class GenARMForCausalLM(nn.Module):
    """A base causal LM and K ARMs stepped together; logits are the GenARM fusion."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from transformers import AutoConfig
        from vllm.compilation.backends import set_model_tag
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        hf_config = vllm_config.model_config.hf_config
        spec = engine_spec(vllm_config)
        if spec is None:
            raise ValueError(f"{ARCHITECTURE} needs the '{HF_CONFIG_KEY}' entry in hf_overrides")
        self.spec = spec
        self.instance_id = vllm_config.instance_id
        self.vocab_size = spec.vocab_size
        self.base = init_vllm_registered_model(
            vllm_config,
            hf_config=hf_config,
            architectures=spec.base_architectures,
            prefix=maybe_prefix(prefix, "base"),
        )
        self.arm_names: list[str] = []
        # Read by vLLM's default loader after the base's own weights, each name given its prefix.
        self.secondary_weights: list[DefaultModelLoader.Source] = []
        hidden_sizes = [hf_config.get_text_config().hidden_size]
        for k, path in enumerate(spec.arm_paths):
            arm_config = AutoConfig.from_pretrained(path)
            name = f"arm{k}"  # no bare number in layer names: vLLM parses them
            # vLLM keys its AOT-compile cache on the config, not on the layer names baked into
            # the compiled graph: two ARMs with identical configs would share one artifact and
            # the second would attend through the first's KV cache. A role attribute keeps
            # every sub-model's key distinct (the base's config already carries the spec).
            arm_config.genarm_submodel = name
            # Each sub-model compiles under its own tag, so compile caches do not collide.
            with set_model_tag(f"genarm_{name}"):
                module = init_vllm_registered_model(
                    vllm_config, hf_config=arm_config, prefix=maybe_prefix(prefix, name)
                )
            setattr(self, name, module)
            self.arm_names.append(name)
            self.secondary_weights.append(
                DefaultModelLoader.Source(model_or_path=path, revision=None, prefix=f"{name}.")
            )
            hidden_sizes.append(arm_config.get_text_config().hidden_size)
        self.hidden_sizes = hidden_sizes
        self.make_empty_intermediate_tensors = None

    @classmethod
    def get_model_state_cls(cls) -> type:
        """Model Runner V2's per-request state hook: the state that carries the weights there."""
        from server.vllm_glue.model_state import GenARMModelState  # imports MRv2: only when it runs

        return GenARMModelState

    @property
    def arms(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.arm_names]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("GenARM guidance needs token ids (prompt embeddings are not supported)")
        out = None
        start = 0
        for module, width in zip([self.base, *self.arms], self.hidden_sizes, strict=True):
            hidden = module(input_ids, positions)
            if out is None:
                out = hidden.new_empty((hidden.shape[0], sum(self.hidden_sizes)))
            # Copy each output before the next sub-model runs: under piecewise CUDA graphs the
            # last piece's output is only weakly held, and the next sub-model's graphs may
            # reuse that memory.
            out[:, start : start + width].copy_(hidden)
            start += width
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # Contiguous, as a plain engine's LM-head input is: a column slice of the concatenation has
        # another leading dimension, for which the GEMM may pick another kernel (other bf16 sums).
        parts = [part.contiguous() for part in torch.split(hidden_states, self.hidden_sizes, dim=-1)]
        base_logits = self.base.compute_logits(parts[0])
        if base_logits is None:  # a tensor-parallel rank that does not hold the logits
            return None
        weights, active = step_weights(self.instance_id, base_logits.shape[0], base_logits.device)
        arm_logits = [self.arms[k].compute_logits(parts[k + 1]) for k in active]
        return fused_logprobs(
            base_logits,
            arm_logits,
            weights,  # [rows, len(active)]: the active ARMs' columns (server.vllm_glue.weights)
            self.vocab_size,
            out_width=base_logits.shape[-1],
            validate=False,  # checked at admission; an unusable row was set to 0 (WeightTable.set)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base's checkpoint names carry no prefix, the ARMs' `armK.`: route each to its
        sub-model (vLLM's AutoWeightsLoader calls each sub-model's own loader)."""
        from vllm.model_executor.models.utils import AutoWeightsLoader

        arm_prefixes = tuple(f"{name}." for name in self.arm_names)
        routed = ((name if name.startswith(arm_prefixes) else f"base.{name}", w) for name, w in weights)
        return AutoWeightsLoader(self).load_weights(routed)


def compile_cache_keys(model: nn.Module) -> dict[str, str]:
    """AOT-compile cache key of each compiled sub-module (for `LLM.apply_model` in tests):
    sub-models must never share one, or one would run with another's layer names."""
    from vllm.compilation.caching import aot_compile_hash_factors

    return {
        name: hashlib.sha256(str(aot_compile_hash_factors(module.vllm_config)).encode()).hexdigest()
        for name, module in model.named_modules()
        if hasattr(module, "vllm_config") and hasattr(module, "do_not_compile")
    }
