"""The README's first command, exactly as a user runs it: `make serve` in a clean environment.

No test-only variable reaches this server (no KV-cache size, no engine mode): it must size
itself, fetch and convert the default base, merge the shipped ARMs, answer a chat request from
the official openai client on :8000, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.server_process import ROOT

README_COMMAND = ["make", "serve"]
URL = "http://localhost:8000"  # what the README tells the user to open
# Only what a login shell gives a user; nothing of the test session (conftest sets engine knobs).
USER_ENVIRONMENT_KEYS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TERM", "SHELL", "TMPDIR")


def readme_first_command() -> str:
    block = (ROOT / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    return block.strip().splitlines()[0].split("#", 1)[0].strip()


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def server_processes(make_pid: int) -> list[psutil.Process]:
    children = psutil.Process(make_pid).children(recursive=True)
    servers = [p for p in children if any("genarm-serve" in part for part in p.cmdline())]
    assert servers, [p.cmdline() for p in children]
    return servers[:1]  # the top one: vLLM's engine processes are its children


def test_readme_lists_this_command_first() -> None:
    assert readme_first_command() == " ".join(README_COMMAND)


def test_make_serve_as_a_user_runs_it(tmp_path: Path) -> None:
    assert not port_in_use(8000), "port 8000 is taken: the README's command needs it"
    environment = {k: os.environ[k] for k in USER_ENVIRONMENT_KEYS if k in os.environ}
    assert not any(k.startswith(("VLLM_", "GENARM_")) for k in environment)
    log = tmp_path / "make-serve.log"
    started = time.monotonic()
    proc = subprocess.Popen(README_COMMAND, cwd=ROOT, env=environment, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`make serve` exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{URL}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 1500:
                pytest.fail(f"no /health after {time.monotonic() - started:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        text = log.read_text()
        assert "genarm-serve: CPU KV cache" in text, "the chosen KV-cache size is said in one line"
        client = openai.OpenAI(base_url=f"{URL}/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is a good way to start the day?"}],
            max_tokens=24,
        )
        assert reply.choices[0].message.content.strip()
        assert reply.model_extra["alignment"]["weights"]  # the server's default weights, echoed
    finally:
        # SIGTERM to the server process, as `docker stop` or Kubernetes sends it (make only relays).
        for server in server_processes(proc.pid):
            server.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    serving, _, shutdown = text.partition("shutdown triggered")
    assert "Traceback" not in serving, serving[-4000:]
    # vLLM 0.32's own drain logs an EngineDeadError traceback from its output handler once the
    # engine has stopped (plain `vllm serve` does the same); what matters is that it completes.
    assert "all workers exited gracefully" in shutdown and "Application shutdown complete" in shutdown, text[-4000:]
    assert proc.returncode == 0, f"`make serve` exited {proc.returncode} after SIGTERM"
    assert not port_in_use(8000), "the server still holds :8000 after SIGTERM"
