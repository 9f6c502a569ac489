"""`genarm-serve`: check the configuration, then run vLLM's OpenAI server on the guided model."""

from __future__ import annotations

import sys

from genarm_common.errors import SetupError
from server.config import parse_args


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if config.model is None:
            from server.defaults import default_model

            config.model = default_model()
        from genarm_common.model_fetch import resolve_model_ref
        from server.adapters import resolve_arms

        model = config.model
        model.base = resolve_model_ref(model.base)
        model.arms = resolve_arms(model.base, {name: resolve_model_ref(p) for name, p in model.arms.items()})
        from server.vllm_glue.launcher import run_openai_server

        run_openai_server(config)
    except SetupError as err:
        for line in str(err).splitlines():
            print(f"genarm-serve: error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
