"""The HTTP API: a real genarm-serve process, real HTTP, the official `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.reference import ReferenceGuidedGenerator, SamplingOptions
from tests.server_process import ServerProcess

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["Human: how do I bake bread?\n\nAssistant:", "Hello there, my friend", "I think that"]


@pytest.fixture(scope="module")
def server(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [
        "--base", str(tiny_family["llama-base"]),
        "--arm", f"harmless={tiny_family['llama-arm-narrow']}",
        "--arm", f"helpful={tiny_family['llama-arm-padded']}",
        "--default-weight", "harmless=1.0",
        "--min-weight", "0", "--max-weight", "20",
        "--served-model-name", "tiny-guided",
        "--api-key", API_KEY,
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
        "--max-waiting-requests", "400", "--seed", "0",
    ]
    proc = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_family: dict[str, Path]) -> ReferenceGuidedGenerator:
    return ReferenceGuidedGenerator(
        tiny_family["llama-base"],
        {"harmless": tiny_family["llama-arm-narrow"], "helpful": tiny_family["llama-arm-padded"]},
    )


def complete(client: openai.OpenAI, prompt: str, weights: dict | None, **kw: object) -> object:
    extra = {"return_token_ids": True}
    if weights is not None:
        extra["alignment"] = {"weights": weights}
    return client.completions.create(
        model="tiny-guided", prompt=prompt, max_tokens=kw.pop("max_tokens", 16),
        temperature=kw.pop("temperature", 0.0), extra_body=extra, **kw,
    )


def test_zero_weights_give_the_base_models_greedy_text(client: openai.OpenAI, reference: ReferenceGuidedGenerator) -> None:
    for prompt in PROMPTS:
        response = complete(client, prompt, {})
        expected = reference.generate([prompt], [{}], SamplingOptions(max_tokens=16))[0]
        assert response.choices[0].token_ids == expected.token_ids
        assert response.model_extra["alignment"] == {"weights": {"harmless": 0.0, "helpful": 0.0}}


def test_weights_steer_and_are_echoed(client: openai.OpenAI, reference: ReferenceGuidedGenerator) -> None:
    changed = 0
    for prompt in PROMPTS:
        base = complete(client, prompt, {})
        guided = complete(client, prompt, {"helpful": 8.0})
        expected = reference.generate([prompt], [{"helpful": 8.0}], SamplingOptions(max_tokens=16))[0]
        assert guided.choices[0].token_ids == expected.token_ids
        assert guided.model_extra["alignment"] == {"weights": {"harmless": 0.0, "helpful": 8.0}}
        changed += base.choices[0].token_ids != guided.choices[0].token_ids
    assert changed >= 1
    defaults = complete(client, PROMPTS[0], None)
    assert defaults.model_extra["alignment"] == {"weights": {"harmless": 1.0, "helpful": 0.0}}


def test_chat_streaming_n_stop_and_logprobs(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about dogs."}]
    chat = client.chat.completions.create(
        model="tiny-guided", messages=messages, max_tokens=12, temperature=0,
        extra_body={"alignment": {"weights": {"harmless": 2.0}}},
    )
    assert chat.choices[0].message.content is not None
    assert chat.model_extra["alignment"] == {"weights": {"harmless": 2.0, "helpful": 0.0}}

    stream = client.chat.completions.create(
        model="tiny-guided", messages=messages, max_tokens=12, temperature=0, stream=True,
        extra_body={"alignment": {"weights": {"harmless": 2.0}}},
    )
    chunks = list(stream)
    assert chunks[0].model_extra["alignment"] == {"weights": {"harmless": 2.0, "helpful": 0.0}}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content

    many = client.completions.create(
        model="tiny-guided", prompt=PROMPTS[1], n=3, max_tokens=8, temperature=1.0, seed=7,
        extra_body={"alignment": {"weights": {"helpful": 1.0}}},
    )
    assert len(many.choices) == 3

    free = complete(client, PROMPTS[0], {"harmless": 1.0}, max_tokens=24)
    stop = free.choices[0].text[3:6]
    stopped = complete(client, PROMPTS[0], {"harmless": 1.0}, max_tokens=24, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text[: free.choices[0].text.find(stop)]

    with_logprobs = complete(client, PROMPTS[2], {"harmless": 1.0}, logprobs=3)
    top = with_logprobs.choices[0].logprobs.top_logprobs
    assert len(top) == 16 and all(len(t) >= 1 for t in top)


def test_logprobs_are_those_of_the_fused_distribution(client: openai.OpenAI, reference: ReferenceGuidedGenerator) -> None:
    weights = {"harmless": 1.5, "helpful": 0.5}
    response = complete(client, PROMPTS[0], weights, logprobs=1)
    ids = reference.encode(PROMPTS[0])
    fused = reference.teacher_forced(ids, response.choices[0].token_ids, weights)
    chosen = fused[range(len(response.choices[0].token_ids)), response.choices[0].token_ids]
    for got, want in zip(response.choices[0].logprobs.token_logprobs, chosen.tolist(), strict=True):
        assert abs(got - want) < 1e-3


BAD_ALIGNMENTS = [
    ({"weights": {"funny": 1.0}}, "alignment.weights.funny", "unknown reward dimension"),
    ({"weights": {"harmless": 50}}, "alignment.weights.harmless", "outside the allowed range"),
    ({"weights": {"harmless": -1}}, "alignment.weights.harmless", "outside the allowed range"),
    ({"weights": {"harmless": "high"}}, "alignment.weights.harmless", "must be a number"),
    ({"weights": {"harmless": True}}, "alignment.weights.harmless", "must be a number"),
    ({"weights": {"harmless": [1]}}, "alignment.weights.harmless", "must be a number"),
    ({"weights": [1, 2]}, "alignment.weights", "must be an object"),
    ("harmless", "alignment", "must be an object"),
    ({"weight": {"harmless": 1}}, "alignment", "unknown alignment field"),
]


@pytest.mark.parametrize("alignment,param,message", BAD_ALIGNMENTS)
def test_bad_alignment_gets_400_naming_the_field(server: ServerProcess, alignment: object, param: str, message: str) -> None:
    body = {"model": "tiny-guided", "prompt": "Hi", "max_tokens": 2, "alignment": alignment}
    for path in ("/v1/completions", "/v1/chat/completions"):
        payload = dict(body)
        if path.endswith("chat/completions"):
            payload.pop("prompt")
            payload["messages"] = [{"role": "user", "content": "Hi"}]
        response = httpx.post(server.url + path, json=payload, headers=AUTH, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and message in error["message"] and error["code"] == 400
        assert error["type"] == "BadRequestError"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_weights_get_400(server: ServerProcess, literal: str) -> None:
    raw = '{"model": "tiny-guided", "prompt": "Hi", "max_tokens": 2, "alignment": {"weights": {"helpful": %s}}}' % literal
    response = httpx.post(server.url + "/v1/completions", content=raw,
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "alignment.weights.helpful"


def test_bad_weights_through_vllm_xargs_are_refused_too(server: ServerProcess) -> None:
    body = {"model": "tiny-guided", "prompt": "Hi", "max_tokens": 2, "vllm_xargs": {"genarm_weight_harmless": 99.0}}
    response = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400 and "outside" in response.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={**body, "vllm_xargs": {"genarm_weight_harmless": 2.0}}, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["alignment"] == {"weights": {"harmless": 2.0, "helpful": 0.0}}


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"prompt_logprobs": 1}), ("/v1/completions", {"echo": True, "logprobs": 1}),
    ("/v1/chat/completions", {"echo": True}),  # vLLM asks for prompt logprobs of top_logprobs (0)
])
def test_prompt_logprobs_get_400_before_the_engine(server: ServerProcess, path: str, extra: dict) -> None:
    """Refused by the HTTP layer: on Model Runner V2 (vLLM 0.26) no engine hook would refuse them."""
    rejected = metric(server, "genarm_rejected_requests_total", 'reason="unsupported_option"')
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    body = {"model": "tiny-guided", **prompt, "max_tokens": 2, **extra}
    response = httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs", response.text
    assert metric(server, "genarm_rejected_requests_total", 'reason="unsupported_option"') == rejected + 1


def test_server_keeps_serving_after_bad_requests(client: openai.OpenAI) -> None:
    assert complete(client, PROMPTS[1], {"harmless": 1.0}).choices[0].text is not None


def test_api_key_is_enforced(server: ServerProcess) -> None:
    body = {"model": "tiny-guided", "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(server.url + "/v1/completions", json=body, headers=wrong, timeout=30).status_code == 401
    bad_and_unauthenticated = {**body, "alignment": {"weights": {"funny": 1}}}
    assert httpx.post(server.url + "/v1/completions", json=bad_and_unauthenticated, timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401


def test_models_lists_dimensions_and_defaults(server: ServerProcess) -> None:
    card = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]
    assert card["id"] == "tiny-guided"
    assert card["alignment"] == {
        "dimensions": ["harmless", "helpful"], "default_weights": {"harmless": 1.0, "helpful": 0.0},
        "min_weight": 0.0, "max_weight": 20.0,
    }


def test_openapi_documents_alignment(server: ServerProcess) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert "weights" in schemas["AlignmentRequest"]["properties"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        post = spec["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert schemas[ref]["properties"]["alignment"] == {"$ref": "#/components/schemas/AlignmentRequest"}
        ok = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["properties"]["alignment"] == {"$ref": "#/components/schemas/AlignmentEcho"}


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    """The sum of the series `name` (with `labels`) on /metrics; a series that is not there fails."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and line.split("{")[0].split(" ")[0] == name and labels in line
    ]
    assert values, f"/metrics has no series {name}{{{labels}}}"
    return sum(values)


def test_metrics_count_guided_and_base_requests(client: openai.OpenAI, server: ServerProcess) -> None:
    guided = metric(server, "genarm_requests_total", 'mode="guided"')
    base = metric(server, "genarm_requests_total", 'mode="base"')
    helpful = metric(server, "genarm_dimension_requests_total", 'dimension="helpful"')
    complete(client, "Hi", {"helpful": 1.0})
    complete(client, "Hi", {})
    assert metric(server, "genarm_requests_total", 'mode="guided"') == guided + 1
    assert metric(server, "genarm_requests_total", 'mode="base"') == base + 1
    assert metric(server, "genarm_dimension_requests_total", 'dimension="helpful"') == helpful + 1
    assert metric(server, "vllm:num_requests_running") >= 0  # vLLM's own metrics stay beside ours
    for reason in ("no_weight_table", "row_count_mismatch", "invalid_weights"):  # the engine's, counted there
        assert metric(server, "genarm_guidance_fallbacks_total", f'reason="{reason}"') == 0


def test_200_concurrent_requests_with_random_disconnects(server: ServerProcess) -> None:
    rng = random.Random(1234)

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int | None]:
        stream = rng.random() < 0.5
        body = {
            "model": "tiny-guided", "prompt": PROMPTS[i % 3] + str(i), "max_tokens": rng.randint(4, 48),
            "temperature": rng.choice([0.0, 0.8]), "stream": stream,
            "alignment": {"weights": {"harmless": rng.choice([0.0, 1.0, 3.0]), "helpful": rng.choice([0.0, 2.0])}},
        }
        disconnect_after = rng.uniform(0.05, 1.5) if rng.random() < 0.3 else None

        async def call() -> int:
            if stream:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_raw():
                        pass
                    return response.status_code
            response = await http.post("/v1/completions", json=body)
            return response.status_code

        if disconnect_after is None:
            return "done", await call()
        try:
            return "done", await asyncio.wait_for(call(), timeout=disconnect_after)
        except TimeoutError:
            return "aborted", None

    async def run_all() -> list[tuple[str, int | None]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    results = asyncio.run(run_all())
    finished = [status for outcome, status in results if outcome == "done"]
    assert len(finished) >= 100
    assert all(status == 200 for status in finished), sorted(set(finished))
    deadline = time.time() + 60
    while time.time() < deadline:
        if metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:num_requests_waiting") == 0:
            break
        time.sleep(1)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:num_requests_waiting") == 0
    assert metric(server, "genarm_inflight_requests") == 0


def test_schemathesis_on_the_endpoints_we_change(server: ServerProcess) -> None:
    """Fuzz our endpoints from /openapi.json: no 5xx, responses match the spec."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema = schema.include(path_regex=r"^/v1/(completions|chat/completions|models)$")
    failures: list[str] = []
    count = 0

    def fuzz(operation: object) -> None:
        # derandomize: the same cases on every run (a fuzz finding must reproduce, not flake)
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: object) -> None:
            nonlocal count
            count += 1
            if isinstance(case.body, dict):  # keep fuzzed generations short on a CPU
                for key in ("max_tokens", "max_completion_tokens", "n", "best_of"):
                    if isinstance(case.body.get(key), int) and case.body[key] > 4:
                        case.body[key] = 4
            response = case.call(headers=AUTH, timeout=120)
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            except Exception as err:  # noqa: BLE001 - collected and reported below
                failures.append(f"{operation.label}: {str(err)[:300]}")

        check()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    assert count > 30
    assert not failures, "\n".join(failures[:10])


@pytest.fixture(scope="module")
def small_server(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No --max-num-seqs: vLLM resolves it, and never above --max-num-batched-tokens (4 here).
    Behind a path-based proxy (--root-path): clients may call with or without the prefix. Two API
    server processes (as `-dp 2` makes), which share one request limit."""
    args = [
        "--base", str(tiny_family["llama-base"]), "--arm", f"harmless={tiny_family['llama-arm-narrow']}",
        # 2048 positions: long requests stay in flight while the 429 test looks
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-batched-tokens", "4",
        "--max-waiting-requests", "1", "--root-path", "/api", "--api-server-count", "2",
    ]
    proc = ServerProcess(args, tmp_path_factory.mktemp("small-server") / "server.log")
    yield proc
    proc.stop()


def test_request_limit_follows_what_the_engine_resolved(server: ServerProcess, small_server: ServerProcess) -> None:
    assert metric(server, "genarm_request_limit") == 8 + 400  # --max-num-seqs 8, --max-waiting-requests 400
    # max_num_seqs resolved to 4; the server's limit, not each API server process's share
    assert metric(small_server, "genarm_request_limit") == 4 + 1


def test_backpressure_answers_429_with_retry_after(tiny_family: dict[str, Path], small_server: ServerProcess) -> None:
    """The server's limit (4 running + 1 waiting) holds across its two API server processes, however
    the kernel spreads the connections over them: five long streamed requests are admitted (their
    headers come back at once), and while they run, three more are refused. The five are then
    dropped (vLLM aborts a request whose client went away)."""
    proc = small_server
    body = {"model": str(tiny_family["llama-base"]), "prompt": "Hello", "max_tokens": 1500,
            "ignore_eos": True, "alignment": {"weights": {"harmless": 1.0}}}

    async def scenario() -> tuple[list[int], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=proc.url, timeout=300) as http, contextlib.AsyncExitStack() as streams:
            admitted = [await streams.enter_async_context(http.stream("POST", "/api/v1/completions", json={**body, "stream": True}))
                        for _ in range(5)]
            refused = await asyncio.gather(*(http.post("/api/v1/completions", json=body) for _ in range(3)))
            return [r.status_code for r in admitted], refused

    admitted, refused = asyncio.run(scenario())
    assert admitted == [200] * 5 and [r.status_code for r in refused] == [429] * 3, (admitted, [r.text for r in refused])
    assert refused[0].headers["retry-after"] == "1"
    assert refused[0].json()["error"]["code"] == 429
    deadline = time.monotonic() + 120
    while metric(proc, "genarm_inflight_requests") > 0:  # the dropped requests leave
        assert time.monotonic() < deadline, "dropped requests stayed in flight"
        time.sleep(0.2)
    after = httpx.post(proc.url + "/v1/completions", json={"model": str(tiny_family["llama-base"]), "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200


def test_generation_paths_with_root_path_or_trailing_slash_are_served_with_alignment(
    tiny_family: dict[str, Path], small_server: ServerProcess
) -> None:
    model = str(tiny_family["llama-base"])
    alignment = {"weights": {"harmless": 2.0}}
    for path, body in (
        ("/api/v1/completions/", {"prompt": "Hi"}),
        ("/v1/completions/", {"prompt": "Hi"}),
        ("/api/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        response = httpx.post(small_server.url + path, json={"model": model, "max_tokens": 2, "alignment": alignment, **body},
                              timeout=60)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["alignment"] == alignment, path
        bad = httpx.post(small_server.url + path, json={"model": model, "max_tokens": 2, **body,
                                                        "alignment": {"weights": {"harmless": 99}}}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "alignment.weights.harmless", path


def test_generation_endpoints_without_alignment_are_refused_clearly(
    tiny_family: dict[str, Path], small_server: ServerProcess
) -> None:
    body = {"model": str(tiny_family["llama-base"]), "input": "Hi", "max_output_tokens": 2}
    for path in ("/v1/responses", "/api/v1/responses/", "/inference/v1/generate", "/v1/messages"):
        response = httpx.post(small_server.url + path, json=body, timeout=60)
        assert response.status_code == 404, (path, response.text)
        message = response.json()["error"]["message"]
        assert "not served with GenARM guidance" in message and "/v1/chat/completions" in message, path
    assert "/v1/responses" not in httpx.get(small_server.url + "/openapi.json", timeout=30).json()["paths"]
