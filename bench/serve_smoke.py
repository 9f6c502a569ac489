"""genarm-serve as the README's `make serve` starts it (no model arguments: SmolLM2-135M-Instruct
guided by the shipped ARMs), checked over HTTP on the machine that runs this: the GPU machine under
the newest vLLM (bench/multigpu_gpu.sh, phase serve33), or here on the CPU.

    python -m bench.serve_smoke --out DIR [--timeout 240] [--expect-runner v1|v2]

One job: start the server, send what a client sends (guided, base alone, two bad requests, guided
again), read /metrics and the server's log, stop it. Writes DIR/serve_smoke.json and
DIR/serve_smoke.log; prints one line per check; exits 1 if any check fails. The tests run the same
server on the CPU (tests/test_http.py, tests/test_readme_serve.py); this is for a platform the CI
machine does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Give me one tip for a rainy weekend."}]


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, Any]:
    """GET (no body) or POST JSON; (status, parsed JSON or text). urllib: the GPU image may lack httpx."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def start_server(log: Path, timeout: float) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # VLLM_SERVER_DEV_MODE: vLLM's /server_info, read below; nothing else changes for this check.
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - started < timeout and proc.poll() is None:
        try:
            if call(f"{url}/health", timeout=2)[0] == 200:
                return proc, url, time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)
    return proc, url, -1.0


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def chat(url: str, model: str, alignment: Any) -> tuple[int, Any]:
    body = {"model": model, "messages": PROMPT, "max_tokens": 32, "temperature": 0}
    if alignment is not None:
        body["alignment"] = alignment
    return call(f"{url}/v1/chat/completions", body)


def metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def run_checks(url: str, log: Path, runner: str) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: Any) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    status, models = call(f"{url}/v1/models")
    model = models["data"][0]["id"] if status == 200 else "unknown"
    check("GET /v1/models", status == 200, model)
    status, reply = chat(url, model, {"weights": {"positive": 0.5}})
    echo = reply.get("alignment") if isinstance(reply, dict) else None
    text = reply["choices"][0]["message"]["content"] if status == 200 else reply
    check("guided chat (positive=0.5): 200, weights echoed", status == 200 and (echo or {}).get("weights", {}).get("positive") == 0.5,
          {"alignment": echo, "text": text})
    status, reply = chat(url, model, {"weights": {}})
    check("base alone ({'weights': {}}): 200", status == 200, reply if status != 200 else reply["choices"][0]["message"]["content"])
    for name, weights in (("unknown dimension", {"nope": 1.0}), ("weight out of range", {"positive": 99})):
        status, reply = chat(url, model, {"weights": weights})
        error = reply.get("error", {}) if isinstance(reply, dict) else {}
        check(f"{name}: 400, OpenAI-style error naming the field",
              status == 400 and str(error.get("param", "")).startswith("alignment.weights"), {"status": status, "error": error})
    status, reply = chat(url, model, {"weights": {"positive": 0.5}})
    check("guided chat again after the bad requests: 200", status == 200, status)
    status, metrics = call(f"{url}/metrics")
    rejected = metric_total(metrics, "genarm_rejected_requests_total") if status == 200 else 0
    check("/metrics counts the 2 refusals (genarm_rejected_requests_total)", rejected >= 2, rejected)
    lines = log.read_text(errors="replace")
    announced = [line for line in lines.splitlines() if line.startswith("genarm: guided engine on")]
    if runner == "v2":  # genarm's choice and vLLM's own line
        ok = bool(announced) and "Model Runner V2" in announced[0] and "Using V2 Model Runner" in lines
    else:
        ok = bool(announced) and "V1 runner" in announced[0]
    check(f"log: the guided engine runs on {runner}", ok, announced[:1])
    # vLLM logs no line for it; its dev-mode /server_info shows the config the server runs with.
    status, info = call(f"{url}/server_info?config_format=json")
    config = info.get("vllm_config", {}) if status == 200 and isinstance(info, dict) else {}
    scheduling = (config.get("scheduler_config") or {}).get("async_scheduling") if isinstance(config, dict) else None
    if runner == "v2":  # the point of the MRv2 port: the guided engine keeps async scheduling
        check("/server_info: async scheduling on", scheduling is True, scheduling if status == 200 else info)
    else:
        check("/server_info: answers (async scheduling recorded)", status == 200, scheduling)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for /health")
    parser.add_argument("--expect-runner", choices=["v1", "v2"], default="v2",
                        help="the model runner the platform should get (README: v2 on CUDA, v1 on the CPU)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "serve_smoke.log"
    proc, url, startup = start_server(log, args.timeout)
    try:
        checks = run_checks(url, log, args.expect_runner) if startup >= 0 else [
            {"check": "server healthy", "ok": False, "detail": log.read_text(errors="replace")[-2000:]}]
    finally:
        stop_server(proc)
    from importlib.metadata import version

    result = {"vllm": version("vllm"), "startup_s": startup, "checks": checks,
              "command": "python -m bench.serve_smoke " + " ".join(sys.argv[1:])}
    (args.out / "serve_smoke.json").write_text(json.dumps(result, indent=1))
    print(f"genarm-serve, vLLM {result['vllm']}: healthy after {startup:.0f} s")
    for c in checks:
        print(("PASS " if c["ok"] else "FAIL ") + c["check"] + ("" if c["ok"] else f": {json.dumps(c['detail'])[:300]}"))
    sys.exit(0 if checks and all(c["ok"] for c in checks) else 1)


if __name__ == "__main__":
    main()
