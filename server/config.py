"""`genarm-serve` configuration: command line and/or a YAML file, checked before anything loads.

    genarm-serve --base PATH --arm harmless=PATH [--arm helpful=PATH] \
        [--default-weight harmless=1.0] [--tensor-parallel-size N] [--data-parallel-size N] \
        [--host H] [--port P] [--api-key KEY] [--config serve.yaml] [other vLLM args ...]

Values on the command line override the YAML file. Arguments this parser does not know are
passed to vLLM's own server unchanged (e.g. --gpu-memory-utilization 0.9).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from genarm_common.errors import SetupError
from genarm_common.settings import load_settings
from server.engine import GuidedModelConfig

API_KEY_ENV = "GENARM_API_KEY"
CONFIG_ENV = "GENARM_CONFIG"  # a YAML file, as --config (containers mount one)
# vLLM 0.26 drops requests in flight on SIGTERM unless given a drain time; orchestrators send
# SIGTERM on every rollout, so genarm-serve drains for this long unless told otherwise.
DEFAULT_SHUTDOWN_TIMEOUT_S = 600
# YAML keys; everything else in the file is refused (a typo should not be silently ignored).
YAML_KEYS = {
    "base", "arms", "default_weights", "min_weight", "max_weight", "host", "port", "api_key",
    "served_model_name", "tensor_parallel_size", "data_parallel_size", "max_waiting_requests",
    "vllm_args",
}


@dataclass
class ServeConfig:
    model: GuidedModelConfig | None  # None: the embedded default pair (see server.defaults)
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_waiting_requests: int = 256  # past this many queued requests: HTTP 429
    vllm_args: list[str] = field(default_factory=list)

    def vllm_argv(self) -> list[str]:
        """The arguments handed to vLLM's OpenAI server (the model ones are added by the glue)."""
        argv = [
            "--host", self.host,
            "--port", str(self.port),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--data-parallel-size", str(self.data_parallel_size),
        ]
        if self.model is not None and self.model.served_model_name:
            argv += ["--served-model-name", self.model.served_model_name]
        if not any(a.split("=")[0] == "--shutdown-timeout" for a in self.vllm_args):
            argv += ["--shutdown-timeout", str(DEFAULT_SHUTDOWN_TIMEOUT_S)]
        return argv + list(self.vllm_args)


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SetupError(f"{what} must look like NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _number(text: Any, what: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise SetupError(f"{what} must be a number, got {text!r}") from None


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SetupError(f"{what} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise SetupError(f"{what} must be a positive integer, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genarm-serve",
        description="OpenAI-compatible server for GenARM guided generation (base + ARMs in one vLLM engine).",
        epilog="Other arguments are passed to vLLM's OpenAI server unchanged.",
    )
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV) or None,
                        help=f"YAML file (or set {CONFIG_ENV}) with any of: " + ", ".join(sorted(YAML_KEYS)))
    parser.add_argument("--base", help="base model: HF folder (or hub id where a hub is reachable)")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=PATH",
                        help="an ARM for reward dimension NAME: merged HF folder or LoRA adapter (repeatable)")
    parser.add_argument("--default-weight", action="append", default=[], metavar="NAME=W",
                        help="weight used when a request names none (default 0)")
    parser.add_argument("--min-weight", type=float, help="smallest weight a request may ask for (default -10)")
    parser.add_argument("--max-weight", type=float, help="largest weight a request may ask for (default 10)")
    parser.add_argument("--served-model-name", help="model name in the API (default: the base path)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key", help=f"require this bearer token (or set {API_KEY_ENV})")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int)
    parser.add_argument("--data-parallel-size", "-dp", type=int)
    parser.add_argument("--max-waiting-requests", type=int,
                        help="requests queued beyond those running before the server answers 429 (default 256)")
    return parser


def parse_args(argv: list[str]) -> ServeConfig:
    """Command line (+ YAML) -> ServeConfig; raises SetupError with one line on a bad value."""
    args, passthrough = build_parser().parse_known_args(argv)
    data = load_settings(args.config, YAML_KEYS) if args.config else {}

    arms: dict[str, str] = {str(k): str(v) for k, v in (data.get("arms") or {}).items()}
    seen: set[str] = set()
    for text in args.arm:
        name, path = _pair(text, "--arm")
        if name in seen:
            raise SetupError(f"reward dimension {name!r} is given twice (--arm)")
        seen.add(name)
        arms[name] = path  # the command line overrides the file
    defaults = {str(k): _number(v, f"default weight {k}") for k, v in (data.get("default_weights") or {}).items()}
    for text in args.default_weight:
        name, value = _pair(text, "--default-weight")
        defaults[name] = _number(value, f"--default-weight {name}")

    base = args.base or data.get("base")
    model = None
    if base or arms:
        if not base:
            raise SetupError("--arm needs --base (the model the ARMs guide)")
        model = GuidedModelConfig(
            base=str(base),
            arms=arms,
            default_weights=defaults,
            min_weight=_number(args.min_weight if args.min_weight is not None else data.get("min_weight", -10.0), "min_weight"),
            max_weight=_number(args.max_weight if args.max_weight is not None else data.get("max_weight", 10.0), "max_weight"),
            served_model_name=args.served_model_name or data.get("served_model_name"),
        )
        model.validate()
    elif defaults:
        raise SetupError("--default-weight needs --base and --arm")

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else data.get(name, default)

    vllm_args = data.get("vllm_args") or []
    if not isinstance(vllm_args, list) or not all(isinstance(a, (str, int, float)) for a in vllm_args):
        raise SetupError("vllm_args must be a list of command-line arguments, e.g. ['--gpu-memory-utilization', '0.9']")
    return ServeConfig(
        model=model,
        host=str(pick("host", "0.0.0.0")),
        port=_positive_int(pick("port", 8000), "port"),
        api_key=pick("api_key", None) or os.environ.get(API_KEY_ENV) or None,
        tensor_parallel_size=_positive_int(pick("tensor_parallel_size", 1), "tensor_parallel_size"),
        data_parallel_size=_positive_int(pick("data_parallel_size", 1), "data_parallel_size"),
        max_waiting_requests=_positive_int(pick("max_waiting_requests", 256), "max_waiting_requests"),
        vllm_args=[str(a) for a in vllm_args] + passthrough,
    )
