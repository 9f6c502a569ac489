"""Start-up time and decode speed of the default server on a CPU machine, eager vs torch.compile.

For each mode, two starts of `genarm-serve` (the default pair, nothing else set): the first with
vLLM's and inductor's compile caches emptied, the second with whatever the first left behind.
Each start is timed to the first 200 from /health, then loaded with the same chat requests (fixed
seed, ignore_eos, so every request decodes the same number of tokens) to get tokens/s.

    python -m bench.startup_cpu --out bench/results        # ~15 min on 2 cores
Writes startup_cpu.json and startup_cpu.md; prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CACHES = [Path.home() / ".cache" / "vllm" / "torch_compile_cache", Path("/tmp") / f"torchinductor_{os.environ.get('USER', 'root')}"]
MODES = {"eager (default on CPU)": [], "torch.compile (--no-enforce-eager)": ["--no-enforce-eager"]}


def start(args: list[str], port: int, log: Path) -> tuple[subprocess.Popen, float]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LANG") if k in os.environ}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(port), "--host", "127.0.0.1", *args],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def load(port: int, requests: int, tokens: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]["id"]

    def one(i: int) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about day {i} of a trip."}],
                "max_tokens": tokens, "temperature": 0.7, "seed": i, "ignore_eos": True}
        reply = httpx.post(url, json=body, timeout=600).json()
        return reply["usage"]["completion_tokens"]

    one(0)  # warm-up request, untimed
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        total = sum(pool.map(one, range(requests)))
    wall = time.monotonic() - started
    return {"tokens": total, "wall_s": wall, "tokens_per_s": total / wall}


def stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)  # the server alone, as an orchestrator does
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    log = Path(tempfile.mkdtemp(prefix="startup-cpu-")) / "server.log"
    for mode, flags in MODES.items():
        for cache in CACHES:
            shutil.rmtree(cache, ignore_errors=True)
        for attempt in ("first start (caches empty)", "second start"):
            load_before = os.getloadavg()[0]
            proc, seconds = start(flags, args.port, log)
            try:
                speed = load(args.port, args.requests, args.tokens)
            finally:
                stop(proc)
            rows.append({"mode": mode, "start": attempt, "seconds_to_health": seconds, **speed,
                         "load_average_before": load_before})
            print(f"{mode:36} {attempt:28} {seconds:6.1f} s to /health, {speed['tokens_per_s']:.1f} tok/s", flush=True)
    eager_speed = sum(r["tokens_per_s"] for r in rows if r["mode"].startswith("eager")) / 2
    compiled_speed = sum(r["tokens_per_s"] for r in rows if r["mode"].startswith("torch")) / 2
    report = {
        "command": "python -m bench.startup_cpu " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "load": f"{args.requests} concurrent chat requests x {args.tokens} tokens (ignore_eos), after one warm-up request",
        "rows": rows,
        "decode_eager_over_compiled": eager_speed / compiled_speed,
    }
    (out / "startup_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Default server on the CPU: start-up and decode, eager vs torch.compile", "",
             f"`{report['command']}` on {report['machine']['cpus']} cores ({report['machine']['processor']}); "
             f"load: {report['load']}. Models already fetched and merged (first fetch + convert: ~25 s more).", "",
             "| mode | start | s to /health | tokens/s | load average before |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['start']} | {r['seconds_to_health']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['load_average_before']:.2f} |")
    lines += ["", f"Decode speed, eager / compiled: {report['decode_eager_over_compiled']:.2f}."]
    (out / "startup_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
