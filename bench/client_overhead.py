"""What the load generator of a serving benchmark costs: httpx's AsyncClient vs aiohttp (the client
of vLLM's own serving benchmark), each sending the same burst of concurrent chat requests of one
token to one real genarm-serve (tiny test models, CPU), side by side in one run.

    python -m bench.client_overhead --requests 512 --out DIR

A client that burns seconds of CPU per burst hides the server it measures: this is why
`bench.multigpu dp` drives its load with aiohttp. Prints a table; writes client_overhead.json/.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Burst = Callable[[str, list[dict[str, Any]]], Awaitable[list[int]]]


async def httpx_burst(url: str, bodies: list[dict[str, Any]]) -> list[int]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in bodies))
    return [r.status_code for r in responses]


async def aiohttp_burst(url: str, bodies: list[dict[str, Any]]) -> list[int]:
    import aiohttp

    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def one(body: dict[str, Any]) -> int:
            async with http.post("/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one(b) for b in bodies))


CLIENTS: dict[str, Burst] = {"httpx": httpx_burst, "aiohttp": aiohttp_burst}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="timed bursts per client, alternating")
    parser.add_argument("--out", type=Path, default=Path("artifacts/client_overhead"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import httpx

    from bench.multigpu import model_setup
    from tests.server_process import ServerProcess

    setup = model_setup("cpu-tiny", args.out / "models")
    server_args = ["--base", setup["base"], "--arm", f"harmless={setup['arms']['harmless']}",
                   "--max-num-seqs", "256", "--max-waiting-requests", str(2 * args.requests), "--dtype", "float32"]
    proc = ServerProcess(server_args, args.out / "server.log", timeout=600)
    try:
        model = httpx.get(proc.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        bodies = [{"model": model, "messages": [{"role": "user", "content": f"Request {i}: tell me something"}],
                   "max_tokens": 1, "temperature": 0.8, "alignment": {"weights": {"harmless": 0.5}}}
                  for i in range(args.requests)]
        asyncio.run(aiohttp_burst(proc.url, bodies))  # untimed: the server meets its first burst
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in CLIENTS}
        for _ in range(args.rounds):
            for name, burst in CLIENTS.items():
                cpu, start = time.process_time(), time.perf_counter()
                statuses = asyncio.run(burst(proc.url, bodies))
                runs[name].append({"wall_s": time.perf_counter() - start, "client_cpu_s": time.process_time() - cpu,
                                   "ok": statuses.count(200)})
    finally:
        proc.stop()
    best = {name: min(r, key=lambda x: x["wall_s"]) for name, r in runs.items()}
    lines = [f"{args.requests} concurrent chat requests of 1 token to one genarm-serve (tiny models, CPU), "
             f"best of {args.rounds} bursts per client, clients alternating.", "",
             "| client | wall s | client CPU s | OK | wall vs aiohttp |", "|---|---|---|---|---|"]
    for name, row in best.items():
        lines.append(f"| {name} | {row['wall_s']:.2f} | {row['client_cpu_s']:.2f} | {row['ok']}/{args.requests} | "
                     f"{row['wall_s'] / best['aiohttp']['wall_s']:.1f}x |")
    table = "\n".join(lines)
    command = " ".join(["python -m bench.client_overhead", *sys.argv[1:]])
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores"
    (args.out / "client_overhead.json").write_text(json.dumps({"command": command, "machine": machine, "runs": runs}, indent=1))
    (args.out / "client_overhead.md").write_text(f"Command: `{command}`; machine: {machine}.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
