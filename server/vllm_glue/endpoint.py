"""The `vllm.endpoint_plugins` entry point: the playground and the alignment middleware on vLLM's
OpenAI app, serving with the spec and the capacity of the engine behind it.

vLLM loads it when VLLM_PLUGINS names it (genarm-serve arranges that). Endpoint plugins attach
before vLLM adds its own middleware, so ours runs inside vLLM's API-key check and CORS handling.
Imports of the HTTP layer stay inside the methods: prometheus_client must not load before the
launcher has chosen where metrics live (server.vllm_glue.launcher).
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from server.vllm_glue.spec import engine_spec

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.datastructures import State
    from vllm.engine.protocol import EngineClient

logger = logging.getLogger("genarm.http")
MAX_WAITING_ENV = "GENARM_MAX_WAITING_REQUESTS"  # genarm-serve's --max-waiting-requests
DEFAULT_MAX_WAITING = 256


class GenARMEndpointPlugin:
    name = "genarm_http"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        from server.http_api import HttpSettings

        self.settings = HttpSettings()  # filled by init_state, once the engine is up

    def attach_router(self, app: FastAPI) -> None:
        from server.http_api import AlignmentMiddleware, patch_openapi
        from server.playground import router as playground_router

        app.include_router(playground_router)
        app.add_middleware(AlignmentMiddleware, settings=self.settings)
        build_openapi = app.openapi
        settings = self.settings

        def openapi() -> dict[str, Any]:
            if not getattr(app, "_genarm_openapi_patched", False):
                app.openapi_schema = patch_openapi(build_openapi(), settings.spec)
                app._genarm_openapi_patched = True
            return app.openapi_schema

        app.openapi = openapi

    async def init_state(self, engine_client: EngineClient | None, state: State, args: Namespace) -> None:
        """Serve with the engine's own spec, and admit what it runs (max_num_seqs per
        data-parallel engine, as vLLM resolved them) plus the queue genarm-serve allows, counted
        across all API server processes (server.admission)."""
        if engine_client is None:  # vLLM's render-only server: no engine, nothing to guide
            return
        config = engine_client.vllm_config
        spec = engine_spec(config)
        if spec is None:
            logger.warning("genarm_http: the engine serves no GenARM model; requests pass through unguided")
            return
        parallel = config.parallel_config
        # The data-parallel engines this server's API processes feed: all of them, or with an
        # external or hybrid load balancer the ones on this node.
        engines = parallel.data_parallel_size_local if parallel.local_engines_only else parallel.data_parallel_size
        running = config.scheduler_config.max_num_seqs * max(1, engines)
        waiting = int(os.environ.get(MAX_WAITING_ENV) or DEFAULT_MAX_WAITING)
        self.settings.serve(spec, running + waiting, getattr(args, "api_server_count", None) or 1)
