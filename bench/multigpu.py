"""Tensor and data parallelism of the guided engine: correctness at each TP size, and throughput.

    python -m bench.engine_gpu correctness --tp N --families qwen2 --out DIR   # the criterion at TP=N
    python -m bench.multigpu tp --size 2 --out DIR        # guided engine speed, TP=1 vs TP=N
    python -m bench.multigpu dp --size 2 --out DIR        # genarm-serve -dp N vs -dp 1 under one load
    python -m bench.multigpu report --out DIR             # multigpu.json + multigpu.md from DIR
    --models cpu-tiny: the tiny test family (CPU processes: VLLM_CPU_OMP_THREADS_BIND="0|1")
    --models gpu-8b-1b: an 8B-class base + 1B-class ARM of another head geometry, dummy weights

Each engine runs in a child process; results are JSON under --out; the table prints last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_gpu import NO_MULTICAST, SPEED_VOCAB, TP_ARGS, run_child, speed_model_folder

ROOT = Path(__file__).resolve().parents[1]


def model_setup(kind: str, root: Path) -> dict[str, Any]:
    """Folders of a base and one ARM, plus engine args and load for the machine kind."""
    sys.path.insert(0, str(ROOT))
    if kind == "cpu-tiny":
        from tests.tiny_family import build_tiny_family

        paths = build_tiny_family(root / "tiny") if not (root / "tiny" / "llama-base").exists() else {
            n: root / "tiny" / n for n in ("llama-base", "llama-arm-narrow")}
        return {"base": str(paths["llama-base"]), "arms": {"harmless": str(paths["llama-arm-narrow"])},
                "engine_args": {"dtype": "float32", "seed": 0, "max_num_seqs": 16}, "batches": [1, 16],
                "new_tokens": 16, "vocab": 512}
    return {"base": str(speed_model_folder("8b", root, SPEED_VOCAB)),
            "arms": {"harmless": str(speed_model_folder("1b", root, SPEED_VOCAB))},
            "engine_args": {"dtype": "bfloat16", "seed": 0, "load_format": "dummy", "max_model_len": 1024,
                            "max_num_seqs": 256, "gpu_memory_utilization": 0.85},
            "batches": [1, 64, 256], "new_tokens": 256, "vocab": SPEED_VOCAB}


def tp_run(setup: dict[str, Any], size: int, out: Path) -> None:
    """The guided engine at TP=size: tokens/s at each batch size (random prompts of 64 tokens,
    random weights, ignore_eos, median of 3 timed batches), through engine_gpu's speed job."""
    args = dict(setup["engine_args"], tensor_parallel_size=size)
    if size > 1:
        args |= TP_ARGS
    job = dict(name=f"tp{size}", kind="speed", base=setup["base"], arms=setup["arms"], vocab=setup["vocab"],
               prompt_len=64, new_tokens=setup["new_tokens"], batches=setup["batches"], engine_args=args)
    run_child(job, out, timeout=1800)


def dp_run(setup: dict[str, Any], size: int, out: Path, requests_count: int, new_tokens: int, repeats: int = 2) -> None:
    """genarm-serve -dp N under bursts of chat requests (mixed weights, sampled, ignore_eos):
    status codes, tokens/s, per-replica completions, and the 429 limit the server derived.

    One untimed warm-up burst first (every API server and replica meets its first requests), then
    `repeats` timed bursts; tok/s is of the median burst (of two: the slower)."""
    import httpx

    sys.path.insert(0, str(ROOT))
    from tests.server_process import ServerProcess

    waiting = requests_count  # room for the whole burst: the load measures throughput, not refusals
    args = ["--base", setup["base"], *[a for d, p in setup["arms"].items() for a in ("--arm", f"{d}={p}")],
            "-dp", str(size), "--max-waiting-requests", str(waiting)]
    for key, value in setup["engine_args"].items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    proc = ServerProcess(args, out.with_suffix(".log"), env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, timeout=1200)
    startup = time.perf_counter() - started
    try:
        model = httpx.get(proc.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        max_running = int(setup["engine_args"]["max_num_seqs"])
        asyncio.run(chat_burst(proc.url, model, list(setup["arms"]), max_running * size, 8, seed=-1))
        before = server_counters(httpx.get(proc.url + "/metrics", timeout=30).text)
        bursts = [asyncio.run(chat_burst(proc.url, model, list(setup["arms"]), requests_count, new_tokens, seed=size * 100 + r))
                  for r in range(repeats)]
        metrics = metrics_between(before, server_counters(httpx.get(proc.url + "/metrics", timeout=30).text))
        median = sorted(bursts, key=lambda b: b["wall_s"])[len(bursts) // 2]
        statuses = [s for burst in bursts for s, _, _ in burst.pop("results")]
        out.write_text(json.dumps({
            "dp": size, "requests": requests_count, "new_tokens": new_tokens, "bursts": len(bursts),
            "ok": statuses.count(200), "status_429": statuses.count(429),
            "status_5xx": sum(s >= 500 for s in statuses),
            "other_status": sorted({s for s in statuses if s not in (200, 429) and s < 500}),
            "wall_s": median["wall_s"], "generated_tokens": median["tokens"], "tokens_per_s": median["tokens"] / median["wall_s"],
            "burst_tokens_per_s": [b["tokens"] / b["wall_s"] for b in bursts], "startup_s": startup,
            # Where a request's time goes: as the client saw it, and inside the engines (vLLM's
            # histograms, over the timed bursts); the client's CPU time shows whether it kept up.
            "client_latency_mean_s": median["latency_mean_s"], "client_cpu_s": median["client_cpu_s"],
            **metrics, "request_limit_expected": max_running * size + waiting,
        }))
    finally:
        proc.stop()


async def chat_burst(url: str, model: str, dimensions: list[str], count: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """`count` chat requests at once; returns wall time, completion tokens, mean latency, the
    client's CPU time and each request's (status, tokens, latency).

    aiohttp, as vLLM's own serving benchmark: httpx's AsyncClient spent ~6 s of CPU on 512
    concurrent requests on this project's CPU machine (aiohttp 0.25 s), which hid the server."""
    import aiohttp

    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=1200)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def one(i: int) -> tuple[int, int, float]:
            body = {"model": model, "messages": [{"role": "user", "content": f"Request {i}: tell me something"}],
                    "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0.8,
                    "alignment": {"weights": {d: rng.choice([0.0, 0.5, 1.0]) for d in dimensions}}}
            sent = time.perf_counter()
            async with http.post("/v1/chat/completions", json=body) as response:
                payload = await response.json(content_type=None)
                latency = time.perf_counter() - sent
                tokens = payload["usage"]["completion_tokens"] if response.status == 200 else 0
                return response.status, tokens, latency

        cpu, start = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(count)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"wall_s": wall, "tokens": sum(t for _, t, _ in results), "client_cpu_s": cpu,
            "latency_mean_s": sum(lat for _, _, lat in results) / len(results), "results": results}


def server_counters(text: str) -> dict[str, dict[str, float]]:
    """From /metrics (prometheus_client's parser): completions per replica, the 429 limit, and the
    engines' summed time and request count per phase (queue, prefill, decode, end to end)."""
    from prometheus_client.parser import text_string_to_metric_families

    counters: dict[str, dict[str, float]] = {"replica": {}, "sum": {}, "count": {}, "limit": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:request_success_total":
                engine = sample.labels.get("engine", "0")
                counters["replica"][engine] = counters["replica"].get(engine, 0.0) + sample.value
            elif sample.name == "genarm_request_limit":
                counters["limit"]["value"] = sample.value
            for phase in ENGINE_PHASES:
                for kind in ("sum", "count"):
                    if sample.name == f"vllm:{phase}_seconds_{kind}":
                        counters[kind][phase] = counters[kind].get(phase, 0.0) + sample.value
    return counters


def metrics_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Completions per replica and the engines' mean time per request in each phase, counting only
    what happened between the two readings (the timed bursts, not the warm-up)."""
    def delta(kind: str, key: str) -> float:
        return after[kind].get(key, 0.0) - before[kind].get(key, 0.0)

    means = {f"engine_{phase}_mean_s": delta("sum", phase) / delta("count", phase)
             for phase in ENGINE_PHASES if delta("count", phase) > 0}
    return {"per_replica_completed": {k: delta("replica", k) for k in after["replica"]},
            "request_limit": after["limit"].get("value"), **means}


ENGINE_PHASES = ("request_queue_time", "request_prefill_time", "request_decode_time", "e2e_request_latency")


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def latency_cell(entry: dict[str, Any]) -> str:
    if "client_latency_mean_s" not in entry:
        return "-"  # measured before these were recorded
    phases = [entry.get(f"engine_{p}_mean_s") for p in ENGINE_PHASES]
    if None in phases:
        return f"{entry['client_latency_mean_s']:.2f} / -"
    queue, prefill, decode, e2e = phases
    return f"{entry['client_latency_mean_s']:.2f} / {e2e:.2f} ({queue:.2f} + {prefill:.2f} + {decode:.2f})"


def report(out: Path, command: str) -> dict[str, Any]:
    """multigpu.json + multigpu.md from the phase results in `out`; prints the tables."""
    result: dict[str, Any] = {"command": command, "correctness": {}, "tp_speed": {}, "dp": {}}
    lines = []
    correct = load_json(out / "correctness.json")
    if correct:
        lines += ["| pair | TP | zero weights == plain vLLM | guided max gap / (1+sum\\|w\\|) | plain vLLM max gap | criterion | greedy sequences equal to TP=1 |",
                  "|---|---|---|---|---|---|---|"]
        for key, entry in sorted(correct.items()):
            label, tp = key.rsplit("/tp", 1)
            row = {k: v for k, v in entry.items() if k != "guided_token_ids"}
            tp1 = correct.get(f"{label}/tp1", {}).get("guided_token_ids")
            if tp1 and entry.get("guided_token_ids"):
                same = sum(a == b for a, b in zip(entry["guided_token_ids"], tp1))
                row["greedy_sequences_equal_tp1"] = f"{same}/{len(tp1)}"
            result["correctness"][key] = row
            if "error" in entry:
                lines.append(f"| {label} | {tp} | error: {entry['error'].splitlines()[-1][:120]} | | | | |")
                continue
            lines.append(f"| {label} | {tp} | {entry['zero_weight_sequences_equal_plain']} | "
                         f"{entry['guided']['max_gap_per_unit_weight']:.3f} | {entry['plain_vllm']['max_gap_to_reference_best']:.3f} | "
                         f"{'pass' if entry['within_plain_deviation'] else 'FAIL'} | {row.get('greedy_sequences_equal_tp1', '-')} |")
        lines.append("")
    tp = {int(p.stem[2:]): load_json(p) for p in sorted(out.glob("tp[0-9]*.json"))}
    if tp:
        lines += ["| guided engine | batch | tok/s | ms per step | vs TP=1 |", "|---|---|---|---|---|"]
        for size, entry in sorted(tp.items()):
            for batch, timing in entry.get("timings", {}).items():
                base = tp.get(1, {}).get("timings", {}).get(batch)
                ratio = f"{timing['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
                step_ms = 1000 * int(batch) / timing["tokens_per_s"]
                lines.append(f"| TP={size} | {batch} | {timing['tokens_per_s']:.0f} | {step_ms:.2f} | {ratio} |")
                result["tp_speed"][f"tp{size}/bs{batch}"] = timing | {"ms_per_step": step_ms}
            if "error" in entry:
                lines.append(f"| TP={size} | error | {entry['error'].splitlines()[-1][:120]} | | |")
        lines.append("")
    dp = {int(p.stem[2:]): load_json(p) for p in sorted(out.glob("dp[0-9]*.json"))}
    if dp:
        lines += ["| genarm-serve | requests OK | 429 | 5xx | tok/s | vs DP=1 | completed per replica | 429 limit (expected) | "
                  "mean latency: client / engine e2e (queue + prefill + decode) s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size, entry in sorted(dp.items()):
            ratio = f"{entry['tokens_per_s'] / dp[1]['tokens_per_s']:.2f}x" if 1 in dp else "-"
            replicas = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(entry["per_replica_completed"].items()))
            sent = entry["requests"] * entry.get("bursts", 1)
            lines.append(f"| DP={size} | {entry['ok']}/{sent} | {entry['status_429']} | {entry['status_5xx']} | "
                         f"{entry['tokens_per_s']:.0f} | {ratio} | {replicas} | {entry['request_limit']:.0f} ({entry['request_limit_expected']}) | "
                         f"{latency_cell(entry)} |")
            result["dp"][f"dp{size}"] = entry
    (out / "multigpu.json").write_text(json.dumps(result, indent=1))
    table = "\n".join(lines)
    (out / "multigpu.md").write_text(table + "\n")
    print(table)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["tp", "dp", "report"])
    parser.add_argument("--size", type=int, default=2)
    parser.add_argument("--models", choices=["cpu-tiny", "gpu-8b-1b"], default="cpu-tiny")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128, help="dp: tokens per request")
    parser.add_argument("--out", type=Path, default=Path("artifacts/multigpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(NO_MULTICAST)
    if args.mode != "report":
        setup = model_setup(args.models, Path(os.environ.get("GENARM_BENCH_MODELS", "/tmp/genarm-bench-models")))
        for size in sorted({1, args.size}):
            target = args.out / f"{args.mode}{size}.json"
            if target.exists() and "error" not in load_json(target):
                continue  # resumable across device calls
            if args.mode == "tp":
                tp_run(setup, size, target)
            else:
                dp_run(setup, size, target, args.requests, args.new_tokens)
    report(args.out, " ".join(["python -m bench.multigpu", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
