"""Tensor and data parallelism of the guided engine: same tokens as one device, and throughput.

    python -m bench.multigpu tp --size 2 --out DIR          # guided engine, TP=1 vs TP=N
    python -m bench.multigpu dp --size 2 --out DIR          # genarm-serve -dp N vs -dp 1, per-replica counts
    python -m bench.multigpu report --out DIR               # multigpu table (markdown) from DIR
    --models cpu-tiny: the tiny test family (CPU processes: VLLM_CPU_OMP_THREADS_BIND="0|1")
    --models gpu-8b-1b: an 8B-class base + 1B-class ARM with random weights (GPU machine)

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

from bench.vllm_worker import run_engine_job

ROOT = Path(__file__).resolve().parents[1]


def model_setup(kind: str, root: Path) -> dict[str, Any]:
    """Folders of a base and one ARM, plus engine args for the machine kind."""
    sys.path.insert(0, str(ROOT))
    if kind == "cpu-tiny":
        from tests.tiny_family import build_tiny_family

        paths = build_tiny_family(root / "tiny") if not (root / "tiny" / "llama-base").exists() else {
            n: root / "tiny" / n for n in ("llama-base", "llama-arm-narrow", "llama-arm-padded")}
        return {"base": str(paths["llama-base"]),
                "arms": {"harmless": str(paths["llama-arm-narrow"]), "helpful": str(paths["llama-arm-padded"])},
                "engine_args": {"dtype": "float32", "seed": 0}, "batches": [16, 64], "new_tokens": 32,
                "vocab": 512}
    from bench.engine_gpu import SPEED_VOCAB, speed_model_folder

    return {"base": str(speed_model_folder("8b", root, SPEED_VOCAB)),
            "arms": {"harmless": str(speed_model_folder("1b", root, SPEED_VOCAB))},
            "engine_args": {"dtype": "bfloat16", "seed": 0, "load_format": "dummy", "max_model_len": 1024,
                            "max_num_seqs": 256, "gpu_memory_utilization": 0.85},
            "batches": [64, 256], "new_tokens": 256, "vocab": SPEED_VOCAB}


def tp_run(setup: dict[str, Any], size: int, out: Path) -> None:
    """The guided engine at TP=size (bench.vllm_worker): greedy tokens on 32 prompts with mixed
    weights, then throughput at each batch size."""
    rng = random.Random(0)
    dims = list(setup["arms"])

    def task(name: str, count: int, new_tokens: int, greedy: bool) -> dict[str, Any]:
        prompts = [[rng.randrange(3, setup["vocab"]) for _ in range(rng.randint(8, 64))] for _ in range(count)]
        weights = [{d: rng.choice([0.0, 0.5, 2.0]) for d in dims} for _ in range(count)]
        return {"name": name, "prompt_ids": prompts, "temperature": 0.0 if greedy else 0.8, "ignore_eos": True,
                "max_tokens": new_tokens, "weights_per_prompt": weights}

    args = dict(setup["engine_args"], tensor_parallel_size=size)
    if size > 1:
        args["distributed_executor_backend"] = "mp"
    tasks = [task("greedy", 32, 32, True), *(task(f"batch-{b}", b, setup["new_tokens"], False) for b in setup["batches"])]
    job = {"engine": {"model": setup["base"], "arms": setup["arms"], "engine_args": args}, "warmup": False,
           "tasks": tasks}
    done = run_engine_job(job, out.parent / "jobs", out.stem, timeout=1800, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    results = {t["name"]: t for t in done["tasks"]}
    tokens = [per[0]["token_ids"] for per in results["greedy"]["samples"]]
    timings = {}
    for batch in setup["batches"]:
        wall = results[f"batch-{batch}"]["wall_s"]
        timings[str(batch)] = {"wall_s": wall, "tokens_per_s": batch * setup["new_tokens"] / wall}
    out.write_text(json.dumps({"tp": size, "greedy_tokens": tokens, "timings": timings}))


def dp_run(setup: dict[str, Any], size: int, out: Path, requests_count: int) -> None:
    """genarm-serve with -dp N; many concurrent requests; per-replica completions from /metrics."""
    import httpx

    sys.path.insert(0, str(ROOT))
    from tests.server_process import ServerProcess

    args = ["--base", setup["base"], *[a for d, p in setup["arms"].items() for a in ("--arm", f"{d}={p}")],
            "-dp", str(size), "--max-waiting-requests", str(requests_count)]
    for key, value in setup["engine_args"].items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = ServerProcess(args, out.with_suffix(".log"), env=env, timeout=1200)
    try:
        model = httpx.get(proc.url + "/v1/models", timeout=30).json()["data"][0]["id"]

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=proc.url, timeout=600) as http:
                rng = random.Random(size)
                bodies = [{"model": model, "prompt": f"Request {i}: tell me something", "max_tokens": setup["new_tokens"],
                           "ignore_eos": True, "temperature": 0.8,
                           "alignment": {"weights": {d: rng.choice([0.0, 1.0]) for d in setup["arms"]}}}
                          for i in range(requests_count)]
                responses = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
                return [r.status_code for r in responses]

        start = time.perf_counter()
        statuses = asyncio.run(burst())
        wall = time.perf_counter() - start
        per_replica: dict[str, float] = {}
        for line in httpx.get(proc.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("vllm:request_success_total{"):
                engine = line.split('engine="', 1)[1].split('"', 1)[0]
                per_replica[engine] = per_replica.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
        out.write_text(json.dumps({
            "dp": size, "requests": requests_count, "ok": statuses.count(200), "wall_s": wall,
            "tokens_per_s": statuses.count(200) * setup["new_tokens"] / wall, "per_replica_completed": per_replica,
        }))
    finally:
        proc.stop()


def report(out: Path) -> str:
    rows = ["| run | result |", "|---|---|"]
    tp = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted(out.glob("tp-*.json"))}
    if 1 in tp:
        for size, result in sorted(tp.items()):
            same = sum(a == b for a, b in zip(result["greedy_tokens"], tp[1]["greedy_tokens"]))
            speeds = ", ".join(f"batch {b}: {t['tokens_per_s']:.0f} tok/s ({t['tokens_per_s'] / tp[1]['timings'][b]['tokens_per_s']:.2f}x TP=1)"
                               for b, t in result["timings"].items())
            rows.append(f"| TP={size} | greedy sequences equal to TP=1: {same}/{len(tp[1]['greedy_tokens'])}; {speeds} |")
    dp = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted(out.glob("dp-*.json"))}
    for size, result in sorted(dp.items()):
        ratio = f" ({result['tokens_per_s'] / dp[1]['tokens_per_s']:.2f}x DP=1)" if 1 in dp else ""
        rows.append(f"| DP={size} | {result['ok']}/{result['requests']} requests OK, {result['tokens_per_s']:.0f} tok/s{ratio}; "
                    f"completed per replica: {result['per_replica_completed']} |")
    table = "\n".join(rows)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["tp", "dp", "report"])
    parser.add_argument("--size", type=int, default=2)
    parser.add_argument("--models", choices=["cpu-tiny", "gpu-8b-1b"], default="cpu-tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("artifacts/multigpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode != "report":
        setup = model_setup(args.models, Path(os.environ.get("GENARM_BENCH_MODELS", "/tmp/genarm-bench-models")))
        for size in sorted({1, args.size}):
            target = args.out / f"{args.mode}-{size}.json"
            if args.mode == "tp":
                tp_run(setup, size, target)
            else:
                dp_run(setup, size, target, args.requests)
    report(args.out)


if __name__ == "__main__":
    main()
