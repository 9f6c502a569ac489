"""What the HTTP API adds to vLLM's OpenAI server: the `alignment` field, its echo, the reward
dimensions on /v1/models, backpressure, and metrics. Plain ASGI: nothing here knows vLLM (the
endpoint plugin fills `HttpSettings` from the engine it serves).

A request may carry `"alignment": {"weights": {"harmless": 1.0}}` on /v1/completions and
/v1/chat/completions. It is validated here (HTTP 400 naming the field) and handed to vLLM as
`vllm_xargs` (`genarm_weight_<dimension>` for every dimension), which reach the engine's weight
table as SamplingParams.extra_args. The weights used come back as `alignment` beside `usage`
(and in the first chunk of a stream).

Why a middleware and not a route: vLLM owns the completion routes (streaming, n, logprobs,
aborts on disconnect...); we only rewrite their JSON on the way in and out. vLLM's other
generation endpoints (/v1/responses, /v1/messages, ...) would serve guided text without the
weights' echo or the capacity limit: they are refused with 404 and left out of /openapi.json.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from server.admission import Admission, admission_for
from server.fusion import WeightError
from server.guidance import PROMPT_LOGPROBS_UNSUPPORTED, GuidanceSpec
from server.metrics import DIMENSION_REQUESTS, INFLIGHT, REJECTED, REQUEST_LIMIT, REQUESTS, WEIGHTS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# vLLM's other routes that generate text: served without `alignment`, its echo or the limit.
REFUSED_PATHS = ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch", "/inference/v1/generate")


@dataclass
class HttpSettings:
    """What the middleware serves with, filled from the engine once it runs (see
    server.vllm_glue.endpoint); until then requests pass through untouched."""

    spec: GuidanceSpec | None = None
    admission: Admission | None = None  # requests in flight against the server's limit

    def serve(self, spec: GuidanceSpec, server_limit: int, api_servers: int = 1) -> None:
        """`server_limit`: what the engines run plus the queue allowed, for the whole server."""
        self.spec, self.admission = spec, admission_for(server_limit, api_servers)
        REQUEST_LIMIT.set(server_limit)
        for name in spec.dimensions:  # every series exists from the start, at 0
            DIMENSION_REQUESTS.labels(dimension=name)


def route_path(scope: Scope) -> str:
    """The path as vLLM's router matches it: without a root path left in front by a proxy, and
    without a trailing slash."""
    path, root = scope["path"], scope.get("root_path") or ""
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    return path.rstrip("/") or "/"


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """The error body vLLM's server uses (OpenAI style)."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "TooManyRequestsError"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


def resolve_weights(body: dict[str, Any], spec: GuidanceSpec) -> dict[str, float]:
    """The weights this request asks for, validated; rewrites `body` for vLLM in place.

    No `alignment`: the server's defaults (or weights a raw vLLM client put in `vllm_xargs`).
    `{"weights": {...}}`: those, 0 for dimensions left out (`{}` is the base model alone).
    """
    xargs = body.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise RequestError("vllm_xargs must be an object", "vllm_xargs")
    xargs = dict(xargs or {})
    from_alignment = "alignment" in body
    try:
        if from_alignment:
            row = spec.row(_requested_weights(body.pop("alignment")))
        else:
            row = spec.row_from_extra_args(xargs)
    except WeightError as err:
        param = f"alignment.weights.{err.dimension}" if from_alignment else "vllm_xargs"
        raise RequestError(str(err), param) from None
    xargs.update(spec.extra_args(spec.as_mapping(row)))
    body["vllm_xargs"] = xargs
    return spec.as_mapping(row)


def refuse_unsupported(body: dict[str, Any], path: str = "/v1/completions") -> None:
    """Options the guided engine cannot serve, refused here: on Model Runner V2 (vLLM 0.26) no
    engine hook refuses them (on V1 the weights processor does too)."""
    prompt_logprobs = body.get("prompt_logprobs") is not None
    if body.get("echo"):  # vLLM turns echo into prompt logprobs of `logprobs` / `top_logprobs`
        if path == "/v1/chat/completions":
            prompt_logprobs |= body.get("top_logprobs", 0) is not None  # vLLM's default: 0
        else:
            prompt_logprobs |= body.get("logprobs") is not None
    if prompt_logprobs:
        raise RequestError(PROMPT_LOGPROBS_UNSUPPORTED, "prompt_logprobs")


def _requested_weights(alignment: object) -> dict[str, object] | None:
    """The `weights` mapping of an `alignment` object (None: use the defaults)."""
    if alignment is None:
        return None
    if not isinstance(alignment, dict):
        raise RequestError('alignment must be an object like {"weights": {"harmless": 1.0}}', "alignment")
    unknown = sorted(set(alignment) - {"weights"})
    if unknown:
        raise RequestError(f"unknown alignment field(s) {unknown}; expected 'weights'", "alignment")
    weights = alignment.get("weights")
    if weights is not None and not isinstance(weights, dict):
        raise RequestError("alignment.weights must be an object of dimension -> number", "alignment.weights")
    return weights


def models_extension(spec: GuidanceSpec) -> dict[str, Any]:
    return {
        "dimensions": spec.dimensions,
        "default_weights": spec.as_mapping(spec.default_weights),
        "min_weight": spec.min_weight,
        "max_weight": spec.max_weight,
    }


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client went away meanwhile."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks), False


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields `body` once, then defers to the client (disconnect notices)."""
    sent = False

    async def inner() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


def _headers_without_length(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() != b"content-length"]


class JsonResponseEditor:
    """Wraps send() to edit a JSON response body, or the first event of an SSE stream."""

    def __init__(self, send: Send, edit: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.edit = edit
        self.start: Message | None = None
        self.mode = "pass"
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            kind = headers.get(b"content-type", b"")
            if message["status"] == 200 and kind.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return
            if message["status"] == 200 and kind.startswith(b"text/event-stream"):
                self.mode, self.start = "sse", message
                await self.send({**message, "headers": _headers_without_length(message.get("headers", []))})
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            body = self._edited_json(self.buffer)
            headers = _headers_without_length(self.start.get("headers", []))
            await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await self.send({"type": "http.response.body", "body": body})
            return
        # SSE: edit the first complete event, then stream the rest untouched.
        end = self.buffer.find(b"\n\n")
        if end < 0 and more:
            return
        if end >= 0:
            event, rest = self.buffer[:end], self.buffer[end:]
            if event.startswith(b"data: ") and event[6:].strip() != b"[DONE]":
                event = b"data: " + self._edited_json(event[6:])
            self.buffer = event + rest
        self.mode = "pass"
        await self.send({"type": "http.response.body", "body": self.buffer, "more_body": more})
        self.buffer = b""

    def _edited_json(self, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict):
            self.edit(data)
        return json.dumps(data).encode()


class AlignmentMiddleware:
    """ASGI middleware for vLLM's app, serving with `settings` (spec, limit) from the engine."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: HttpSettings) -> None:
        self.app = app
        self.settings = settings

    @property
    def spec(self) -> GuidanceSpec | None:
        return self.settings.spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.spec is None:
            await self.app(scope, receive, send)
            return
        path, method = route_path(scope), scope["method"]
        if method == "POST" and path in GENERATION_PATHS:
            # Served at the slash-less path (vLLM would answer a redirect to it otherwise).
            raw = scope.get("raw_path")
            scope = {**scope, "path": scope["path"].rstrip("/"), "raw_path": raw.rstrip(b"/") if raw else raw}
            await self._generate(scope, receive, send)
        elif method == "POST" and path in REFUSED_PATHS:
            REJECTED.labels(reason="unsupported_endpoint").inc()
            message = (f"{path} is not served with GenARM guidance; use {' or '.join(GENERATION_PATHS)} "
                       "(they take `alignment` and echo the weights used)")
            await send_json(send, 404, error_body(404, message))
        elif method == "GET" and path == "/v1/models":
            await self.app(scope, receive, JsonResponseEditor(send, self._add_dimensions))
        else:
            await self.app(scope, receive, send)

    def _add_dimensions(self, data: dict[str, Any]) -> None:
        for card in data.get("data", []):
            if isinstance(card, dict):
                card["alignment"] = models_extension(self.spec)

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw, disconnected = await read_body(receive)
        if disconnected:
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # not ours to judge: vLLM answers malformed JSON itself
            await self.app(scope, replay(raw, receive), send)
            return
        try:
            refuse_unsupported(body, route_path(scope))
        except RequestError as err:
            REJECTED.labels(reason="unsupported_option").inc()
            await send_json(send, 400, error_body(400, str(err), err.param))
            return
        try:
            weights = resolve_weights(body, self.spec)
        except RequestError as err:
            REJECTED.labels(reason="bad_alignment").inc()
            await send_json(send, 400, error_body(400, str(err), err.param))
            return
        admission = self.settings.admission
        if admission is not None and not admission.try_enter():
            REJECTED.labels(reason="queue_full").inc()
            await send_json(
                send, 429,
                error_body(429, f"the server is at capacity ({admission.limit} requests in flight); retry shortly"),
                [(b"retry-after", b"1")],
            )
            return
        REQUESTS.labels(mode="guided" if any(weights.values()) else "base").inc()
        for name, value in weights.items():
            WEIGHTS.labels(dimension=name).observe(value)
            if value:
                DIMENSION_REQUESTS.labels(dimension=name).inc()
        echo = {"weights": weights}

        def add_echo(data: dict[str, Any]) -> None:
            data["alignment"] = echo

        INFLIGHT.inc()
        try:
            await self.app(scope, replay(json.dumps(body).encode(), receive), JsonResponseEditor(send, add_echo))
        finally:
            if admission is not None:
                admission.leave()
            INFLIGHT.dec()


def patch_openapi(schema: dict[str, Any], spec: GuidanceSpec | None) -> dict[str, Any]:
    """Document `alignment` on the generation requests and responses, and on /v1/models; leave
    out the generation endpoints the middleware refuses."""
    for path in REFUSED_PATHS:
        schema.get("paths", {}).pop(path, None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    names = spec.dimensions if spec else []
    weights = {
        "type": "object",
        "description": "Guidance weight per reward dimension" + (f" ({', '.join(names)})" if names else "")
        + "; dimensions left out get 0. Omit `alignment` for the server's defaults; {} for the base model alone.",
        "additionalProperties": {"type": "number"},
    }
    if names:
        weights["properties"] = {n: {"type": "number"} for n in names}
    components["AlignmentRequest"] = {
        "type": "object", "title": "AlignmentRequest",
        "properties": {"weights": weights},
        "additionalProperties": False,
    }
    components["AlignmentEcho"] = {
        "type": "object", "title": "AlignmentEcho",
        "description": "The weights this request was served with.",
        "properties": {"weights": {"type": "object", "additionalProperties": {"type": "number"}}},
        "required": ["weights"],
    }
    for path in GENERATION_PATHS:
        post = schema.get("paths", {}).get(path, {}).get("post")
        if not post:
            continue
        for target in _schemas_of(post.get("requestBody", {}), components):
            target.setdefault("properties", {})["alignment"] = {"$ref": "#/components/schemas/AlignmentRequest"}
        ok = (post.get("responses") or {}).get("200", {}).get("content", {}).get("application/json")
        if ok is not None:
            targets = _schemas_of({"content": {"json": ok}}, components)
            if not targets:  # vLLM declares no response model: document at least our field
                ok["schema"] = targets_holder = {
                    "type": "object",
                    "description": "The OpenAI response object, plus the weights it was served with.",
                    "properties": {},
                }
                targets = [targets_holder]
            for target in targets:
                target.setdefault("properties", {})["alignment"] = {"$ref": "#/components/schemas/AlignmentEcho"}
    return schema


def _schemas_of(holder: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    """Object schemas (resolved $refs, anyOf members) under holder's content types."""
    found = []
    for media in (holder.get("content") or {}).values():
        stack = [media.get("schema") or {}]
        while stack:
            node = stack.pop()
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                node = components.get(ref.rsplit("/", 1)[1], {})
            if node.get("type") == "object" or "properties" in node:
                found.append(node)
            stack.extend(node.get("anyOf", []) + node.get("oneOf", []))
    return found
