"""Runs vLLM's OpenAI server (the `vllm serve` code path) on the guided model, for genarm-serve."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from server.admission import ADMISSION_FILE_ENV, create_admission_file
from server.vllm_glue.endpoint import MAX_WAITING_ENV

if TYPE_CHECKING:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server.config import ServeConfig

logger = logging.getLogger("genarm.serve")
PLUGIN_NAMES = ("genarm", "genarm_http")  # our vllm.general_plugins and vllm.endpoint_plugins

# Engine arguments that guided_engine_args reads or sets, picked off vLLM's parsed CLI.
_GUIDED_ENGINE_KEYS = (
    "hf_overrides", "logits_processors", "max_model_len", "load_format", "speculative_config",
    "pipeline_parallel_size", "enable_prompt_embeds", "served_model_name", "attention_backend",
    "attention_config", "kv_cache_memory_bytes", "dtype", "max_num_seqs", "tensor_parallel_size",
    "data_parallel_size", "enable_chunked_prefill", "max_num_batched_tokens",
)
_metrics_dir: tempfile.TemporaryDirectory | None = None


def share_metrics_across_processes() -> None:
    """Let /metrics show what every process of the server counts (the engine's fallbacks are
    counted in its own process): prometheus_client's multiprocess mode, which vLLM uses itself
    with several API servers. It must be chosen before prometheus_client is first imported."""
    global _metrics_dir
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    if "prometheus_client" in sys.modules:  # too late: this process already counts in memory
        logger.warning("genarm-serve: metrics of the engine's processes will not show on /metrics")
        return
    _metrics_dir = tempfile.TemporaryDirectory(prefix="genarm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir.name


def share_admission_across_processes() -> None:
    """One count of the requests in flight for every API server process (server.admission): a
    fresh counter file, whose path the processes vLLM spawns inherit through the environment."""
    path = create_admission_file()
    atexit.register(path.unlink, missing_ok=True)
    os.environ[ADMISSION_FILE_ENV] = str(path)


def _vllm_server_parser() -> FlexibleArgumentParser:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM >= 0.33
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:
        try:  # vLLM 0.30 - 0.32
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
        except ImportError:  # vLLM 0.26
            from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser(prog="genarm-serve"))


def _engine_choices(args: Namespace, argv: list[str]) -> dict[str, Any]:
    """The engine arguments the user chose, off vLLM's parsed command line."""
    given = {key: getattr(args, key) for key in _GUIDED_ENGINE_KEYS if getattr(args, key, None) is not None}
    # vLLM's parser fills in defaults for these; only what the user typed is a choice.
    typed = {a.split("=")[0].replace("_", "-") for a in argv}
    if "--gpu-memory-utilization" in typed:
        given["gpu_memory_utilization"] = args.gpu_memory_utilization
    if typed & {"--enforce-eager", "--no-enforce-eager"}:
        given["enforce_eager"] = args.enforce_eager
    if typed & {"--compilation-config", "-cc"} or any(flag.startswith("-O") for flag in typed):
        given["compilation_config"] = args.compilation_config
    return given


def run_openai_server(serve_config: ServeConfig) -> None:
    """Start vLLM's OpenAI server on the guided model; blocks until the server stops."""
    share_metrics_across_processes()
    share_admission_across_processes()
    from vllm.entrypoints.cli.serve import ServeSubcommand

    from server.engine import guided_engine_args

    argv = serve_config.vllm_argv()
    args = _vllm_server_parser().parse_args(argv)
    engine_args, _ = guided_engine_args(serve_config.model, _engine_choices(args, argv))
    for key, value in engine_args.items():
        setattr(args, key, value)
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them; keep any the user named.
    named = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*named, *PLUGIN_NAMES]))
    os.environ[MAX_WAITING_ENV] = str(serve_config.max_waiting_requests)
    if serve_config.api_key:
        os.environ["VLLM_API_KEY"] = serve_config.api_key  # vLLM's own auth; kept off the argv
    ServeSubcommand().validate(args)
    ServeSubcommand.cmd(args)
