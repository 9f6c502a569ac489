"""Guided engine on the GPU machine: correctness against the reference, and speed vs plain vLLM.

    python -m bench.engine_gpu correctness --out DIR      # bf16, teacher-forced vs fp32 reference
        [--families llama qwen2] [--arm-roles same other] [--tp N] [--runner v1|v2] [--plain-twice]
        [--real-base HF_FOLDER --real-arm NAME=PATH ...]
    python -m bench.engine_gpu speed --pairs 1b+1b 8b+1b [--runners v1 v2] --out DIR
    python -m bench.engine_gpu reference-speed --pairs 1b+1b 8b+1b --out DIR
    python -m bench.engine_gpu report --out DIR           # engine.json + engine.md from DIR
    python -m bench.engine_gpu explain --out DIR --label real-v2 --real-base HF_FOLDER --real-arm NAME=PATH
                                                          # one pair's raw outputs scored again here
    (--smoke: tiny sizes, for a dry run on a CPU machine)

Every engine runs in its own child process (bench.vllm_worker: its GPU memory is returned when it
exits, and one crash does not end the run); results are JSON files under --out; `report` prints
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.vllm_worker import run_engine_job
from server.vllm_glue.parallel import NO_ALLREDUCE_FUSION

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 256
BATCHES = [1, 16, 64, 256]

# Real geometries (Llama 3.2 1B, Llama 3.1 8B); dummy weights for speed.
SPEED_CONFIGS: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # --smoke stand-ins
    "tiny-a": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "tiny-b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
}
SPEED_VOCAB = 128256
# NVLink multicast off in every process (it can put shared GPUs out of service).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# vLLM's own process layout, and the compilation the guided engine gets at TP > 1 on CUDA (no
# all-reduce fusion: server/vllm_glue/parallel.py), for the plain baseline too.
TP_ARGS = {"distributed_executor_backend": "mp", "compilation_config": NO_ALLREDUCE_FUSION}
RUNNERS = ("v1", "v2")  # the guided engine's model runners (server/vllm_glue/runner.py)


def runner_env(runner: str | None) -> dict[str, str]:
    """The environment that puts a guided engine (or a plain one on its runtime) on `runner`;
    None: the platform's default."""
    return {"GENARM_RUNNER": runner} if runner else {}


# ------------------------------------------------------------------------------------ models


def word_tokenizer(vocab: int, out_dir: Path) -> None:
    """A tokenizer of exactly `vocab` tokens (speed runs feed token ids; text is irrelevant)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # A chat template too: the multi-GPU benchmark sends chat requests.
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}").save_pretrained(out_dir)


def speed_model_folder(name: str, root: Path, vocab: int) -> Path:
    """config.json + tokenizer only: engines load these with load_format='dummy'."""
    from transformers import LlamaConfig

    folder = root / name
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rope_theta=500000.0,
                             bos_token_id=1, eos_token_id=2, **SPEED_CONFIGS[name])
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(folder)
        word_tokenizer(vocab, folder)
    return folder


def correctness_family(arch: str, root: Path, smoke: bool) -> dict[str, Path]:
    """Random bf16 models sharing one tokenizer: base, an ARM of the same geometry, an ARM of
    another geometry (other head size / head counts / depth) with a padded vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    sys.path.insert(0, str(ROOT))
    from tests.tiny_family import train_tokenizer

    out = root / arch
    tokenizer = train_tokenizer(out / "tokenizer", vocab_size=512 if smoke else 4096, records=1000)
    vocab = len(tokenizer)
    padded = vocab + 64
    if arch == "llama":
        cls = LlamaConfig
        shapes = {  # base: head_dim 128 (8B-like); other: head_dim 64 (1B-like)
            "base": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=128, num_hidden_layers=4),
            "arm-same": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=128, num_hidden_layers=4),
            "arm-other": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_hidden_layers=3, vocab_size=padded),
        }
    else:
        cls = Qwen2Config
        shapes = {  # base: Qwen2.5-0.5B-like heads (14 x 64, 2 KV); other: 8 x 128, 4 KV
            "base": dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=4),
            "arm-same": dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=4),
            "arm-other": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2, vocab_size=padded),
        }
    if smoke:  # CPU dry run: same roles, tiny shapes (head sizes 32 and 64)
        for name, shape in shapes.items():
            heads, kv = (2, 1) if name == "arm-other" else (4, 2)
            shape.update(hidden_size=128, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=2)
            shape.pop("head_dim", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = {}
    for seed, (name, shape) in enumerate(shapes.items()):
        folder = out / name
        paths[name] = folder
        if (folder / "config.json").exists():
            continue
        shape = {"vocab_size": vocab, "intermediate_size": shape["hidden_size"] * 3, **shape}
        config = cls(max_position_embeddings=4096, initializer_range=0.05, tie_word_embeddings=False,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
        torch.manual_seed(1000 + seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return paths


# ------------------------------------------------------------------------------------ engines


def run_child(job: dict[str, Any], out_file: Path, timeout: int = 900) -> dict[str, Any]:
    """Run one engine job in a child process (bench.vllm_worker); returns {"job", "outputs" |
    "timings"}, or {"job", "error"} (one crash does not end the run). A "generate" job names
    `weight_sets` {task name: weights per prompt}: one greedy task each, on one engine."""
    started = time.time()
    engine = {"model": job["base"], "arms": job.get("arms"), "engine_args": job.get("engine_args", {}),
              "baseline": bool(job.get("baseline"))}
    if job["kind"] == "generate":
        tasks = [{"name": name, "prompt_ids": job["prompt_ids"], "temperature": 0.0, "ignore_eos": True,
                  "max_tokens": job["max_tokens"], "logprobs": True, "weights_per_prompt": weights}
                 for name, weights in job["weight_sets"].items()]
    else:
        tasks = speed_tasks(job)
    worker_job = {"engine": engine, "warmup": job["kind"] == "speed", "tasks": tasks}
    try:
        # vLLM's own process layout on the GPU (the worker's default is one in-process engine).
        done = run_engine_job(worker_job, out_file.parent / "jobs", out_file.stem, timeout=timeout,
                              env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", **runner_env(job.get("runner")), **job.get("env", {})})
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        tail = "\n".join(str(err).strip().splitlines()[-15:])
        result = {"job": job, "error": tail}
        out_file.write_text(json.dumps(result))
        print(f"[{job['name']}] FAILED after {time.time() - started:.0f}s:\n{tail}", flush=True)
        return result
    result: dict[str, Any] = {"job": job, **{k: done.get(k) for k in ("startup_s", "model_runner", "async_scheduling", "device", "vllm")}}
    if job["kind"] == "generate":
        result["outputs"] = {task["name"]: [{"token_ids": per[0]["token_ids"], "logprobs": per[0]["logprobs"]}
                                            for per in task["samples"]] for task in done["tasks"]}
    else:
        result["timings"] = speed_timings(job, done["tasks"])
    out_file.write_text(json.dumps(result))
    print(f"[{job['name']}] done in {time.time() - started:.0f}s", flush=True)
    return result


def speed_tasks(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size, `repeats` timed batches of random prompts, random weights, ignore_eos."""
    rng = random.Random(0)
    dims = list(job.get("arms") or {})
    tasks = []
    for size in job["batches"]:
        for repeat in range(job.get("repeats", 3)):
            prompts = [[rng.randrange(3, job["vocab"]) for _ in range(job["prompt_len"])] for _ in range(size)]
            weights = [{d: rng.choice([0.5, 1.0, 2.0]) for d in dims} for _ in range(size)] if dims else None
            tasks.append({"name": f"bs{size}-r{repeat}", "prompt_ids": prompts, "temperature": 0.0, "ignore_eos": True,
                          "max_tokens": job["new_tokens"], "weights_per_prompt": weights})
    return tasks


def speed_timings(job: dict[str, Any], tasks: list[dict[str, Any]]) -> dict[str, Any]:
    timings = {}
    for size in job["batches"]:
        runs = [t["wall_s"] for t in tasks if t["name"].startswith(f"bs{size}-")]
        wall = statistics.median(runs)
        timings[str(size)] = {"wall_s": wall, "tokens_per_s": size * job["new_tokens"] / wall, "runs": runs}
        print(json.dumps({job["name"]: {size: timings[str(size)]}}), flush=True)
    return timings


# ------------------------------------------------------------------------------------ phases


def engine_args_for(smoke: bool, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(seed=0, max_num_seqs=256)
    if smoke:
        args.update(dtype="float32", max_num_batched_tokens=256)
    else:
        args.update(dtype="bfloat16", gpu_memory_utilization=0.85)
    return args | extra


def prompt_set(tokenizer: Any, count: int, rng: Any, max_len: int = 400) -> list[list[int]]:
    """`count` prompts of mixed length (4..max_len tokens) cut from held-out HH-RLHF dialogues."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_family import corpus_lines

    lines = corpus_lines(200, skip=400)
    prompts = []
    for _ in range(count):
        ids = tokenizer(lines[int(rng.integers(len(lines)))]).input_ids
        prompts.append(ids[: int(rng.integers(4, min(len(ids), max_len) + 1))] or ids[:4])
    return prompts


def check_pair(label: str, base: str, arms: dict[str, str], out: Path, smoke: bool, tp: int = 1,
               count: int = 48, max_tokens: int = 64, weight_choices: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0),
               runner: str | None = None, plain_twice: bool = False) -> dict[str, Any]:
    """The engine correctness criterion for one base + ARMs at tensor-parallel size `tp`, on the
    guided engine's model `runner` (None: the platform's default). `plain_twice`: also a second
    plain engine compiled afresh (its own compile cache), to show how far plain vLLM reproduces
    itself: the floor under "zero weights == plain vLLM".

    Greedy, bf16: the guided engine with mixed per-request weights, the guided engine with zero
    weights, and plain vLLM (same runner and attention backend), same prompts; every generated
    token teacher-forced through the fp32 reference. Passes when (a) zero weights reproduce plain
    vLLM token for token and (b) each guided token's gap to the reference's best, divided by
    1 + sum |w|, stays within plain vLLM's own largest gap (its bf16 deviation), same run, same TP.
    """
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from server.reference import ReferenceGuidedGenerator

    rng = np.random.default_rng(0)
    prompt_ids = prompt_set(AutoTokenizer.from_pretrained(base), 8 if smoke else count, rng)
    count = len(prompt_ids)
    weights = [{d: float(rng.choice(weight_choices)) for d in arms} for _ in range(count)]
    weights[0] = {d: 0.0 for d in arms}
    zeros = [{d: 0.0 for d in arms} for _ in range(count)]
    args = engine_args_for(smoke, max_num_seqs=64, tensor_parallel_size=tp)
    if tp > 1:
        args |= TP_ARGS
    common = dict(kind="generate", base=base, prompt_ids=prompt_ids, max_tokens=16 if smoke else max_tokens,
                  engine_args=args, runner=runner)
    guided = run_child(common | dict(name=f"{label}-tp{tp}-guided", arms=arms,
                                     # zero first: like plain vLLM, it prefills every prompt from scratch
                                     # (the later task finds the prompts in the prefix cache).
                                     weight_sets={"zero": zeros, "guided": weights}), out / f"correct-{label}-tp{tp}-guided.json")
    plain = run_child(common | dict(name=f"{label}-tp{tp}-plain", baseline=True,
                                    weight_sets={"plain": None}), out / f"correct-{label}-tp{tp}-plain.json")
    entry: dict[str, Any] = {"tensor_parallel_size": tp, "sequences": count, "weights": list(weight_choices),
                             "model_runner": {"guided": guided.get("model_runner"), "plain": plain.get("model_runner")},
                             "async_scheduling": {"guided": guided.get("async_scheduling"), "plain": plain.get("async_scheduling")}}
    if "outputs" not in guided or "outputs" not in plain:
        entry["error"] = guided.get("error") or plain.get("error")
        return entry
    zero, plain_out = guided["outputs"]["zero"], plain["outputs"]["plain"]
    if plain_twice:
        again = run_child(common | dict(name=f"{label}-tp{tp}-plain-again", baseline=True, weight_sets={"plain": None},
                                        env={"VLLM_CACHE_ROOT": str((out / "jobs" / f"{label}-tp{tp}-fresh-cache").resolve())}),
                          out / f"correct-{label}-tp{tp}-plain-again.json")
        if "outputs" in again:
            equal = sum(a["token_ids"] == b["token_ids"] for a, b in zip(again["outputs"]["plain"], plain_out, strict=True))
            entry["plain_recompiled_sequences_equal_plain"] = f"{equal}/{len(plain_out)}"
    same = [a["token_ids"] == b["token_ids"] for a, b in zip(zero, plain_out, strict=True)]
    entry["zero_weight_sequences_equal_plain"] = f"{sum(same)}/{len(same)}"
    entry["zero_weight_matches_plain_vllm"] = all(same)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = ReferenceGuidedGenerator(base, arms, device=device, dtype=torch.float32)
    score_against_plain(entry, reference, prompt_ids, weights, guided["outputs"]["guided"], plain_out)
    del reference
    if device == "cuda":
        torch.cuda.empty_cache()
    entry["guided_token_ids"] = [o["token_ids"] for o in guided["outputs"]["guided"]]
    print(json.dumps({f"{label}/tp{tp}": {k: v for k, v in entry.items() if k != "guided_token_ids"}}), flush=True)
    return entry


def score_against_plain(entry: dict[str, Any], reference: Any, prompt_ids: list, weights: list,
                        guided: list, plain: list) -> None:
    """The deviation half of the criterion, into `entry`; every guided token past plain vLLM's
    floor comes with its parts (component_margins), so a failure shows whose error it took."""
    entry["guided"], divergent = teacher_forced_stats(reference, prompt_ids, weights, guided)
    entry["plain_vllm"], _ = teacher_forced_stats(reference, prompt_ids, [{}] * len(prompt_ids), plain)
    floor = entry["plain_vllm"]["max_gap_to_reference_best"]
    entry["criterion"] = CRITERION
    entry["within_plain_deviation"] = entry["guided"]["max_gap_per_unit_weight"] <= floor
    over = [t for t in divergent if t["gap_per_unit_weight"] > floor]
    entry["guided_tokens_over_plain_floor"] = component_margins(reference, prompt_ids, guided, over)


def explain(out: Path, label: str, tp: int, base: str, arms: dict[str, str]) -> dict[str, Any]:
    """Scores one pair's raw engine outputs (correct-<label>-tp<N>-*.json, e.g. brought back from
    the GPU machine) again on this machine's fp32 reference, with the base and ARMs found here:
    the stats of check_pair plus the parts of each guided token past plain vLLM's floor."""
    import torch

    from server.adapters import resolve_arms
    from server.reference import ReferenceGuidedGenerator

    guided = json.loads((out / f"correct-{label}-tp{tp}-guided.json").read_text())
    plain = json.loads((out / f"correct-{label}-tp{tp}-plain.json").read_text())
    prompt_ids = guided["job"]["prompt_ids"]
    weights = guided["job"]["weight_sets"]["guided"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = ReferenceGuidedGenerator(base, resolve_arms(base, arms), device=device, dtype=torch.float32)
    entry: dict[str, Any] = {"engine": {"vllm": guided.get("vllm"), "device": guided.get("device"),
                                        "model_runner": guided.get("model_runner")}, "reference_device": device}
    score_against_plain(entry, reference, prompt_ids, weights, guided["outputs"]["guided"], plain["outputs"]["plain"])
    (out / f"explain-{label}-tp{tp}.json").write_text(json.dumps(entry, indent=1))
    keys = ("max_gap_per_unit_weight", "max_abs_logprob_error_per_unit_weight", "p99_abs_logprob_error_per_unit_weight")
    print("| engine | " + " | ".join(keys) + " |\n|---|---|---|---|")
    for side in ("guided", "plain_vllm"):
        print(f"| {side} | " + " | ".join(f"{entry[side][k]:.3f}" for k in keys) + " |")
    for token in entry["guided_tokens_over_plain_floor"]:
        print(json.dumps(token))
    return entry


def correctness(out: Path, smoke: bool, families: list[str], tp: int = 1,
                real_pair: tuple[str, dict[str, str]] | None = None, runner: str | None = None,
                arm_roles: tuple[str, ...] = ("same", "other"), plain_twice: bool = False) -> dict[str, Any]:
    """check_pair on each random mixed-geometry family (and on a real base + ARM if given), at `tp`,
    on `runner`; results merged into out/correctness.json under "<family>[<roles>][-<runner>]/tp<N>".
    `arm_roles`: which of a family's ARMs guide (the same geometry as the base, another, or both)."""
    summary_file = out / "correctness.json"
    summary: dict[str, Any] = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    models_root = Path(os.environ.get("GENARM_BENCH_MODELS", "/tmp/genarm-bench-models"))
    pairs = []
    if real_pair:  # first: a real pair is the strongest evidence if a call runs out of time
        from server.adapters import resolve_arms

        base, arms = real_pair
        pairs.append(("real", base, resolve_arms(base, arms)))
    for arch in families:
        paths = correctness_family(arch, models_root, smoke)
        label = arch if set(arm_roles) == {"same", "other"} else f"{arch}[{'+'.join(arm_roles)}]"
        pairs.append((label, str(paths["base"]), {role: str(paths[f"arm-{role}"]) for role in arm_roles}))
    for label, base, arms in pairs:
        label = f"{label}-{runner}" if runner else label
        key = f"{label}/tp{tp}"
        if key in summary and "error" not in summary[key]:
            continue  # resumable across device calls
        summary[key] = check_pair(label, base, arms, out, smoke, tp=tp, runner=runner, plain_twice=plain_twice)
        summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def teacher_forced_stats(reference: Any, prompt_ids: list, weights: list,
                         outputs: list) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every generated token through the fp32 reference: how far each choice is from the
    reference's best, and each log-prob's error, also per unit of total weight (bf16 error scales
    with 1 + sum of weights). Also returns the tokens off the reference's argmax."""
    import numpy as np
    import torch

    gaps, scaled, errors, unit_errors, divergent, exact = [], [], [], [], [], 0
    for sequence, (ids, w, o) in enumerate(zip(prompt_ids, weights, outputs, strict=True)):
        fused = reference.teacher_forced(ids, o["token_ids"], w).cpu()
        chosen = torch.tensor(o["token_ids"])
        best = fused.max(dim=-1).values
        got = fused[torch.arange(len(chosen)), chosen]
        total = 1 + sum(abs(v) for v in w.values())
        gap = (best - got).tolist()
        gaps.extend(gap)
        scaled.extend(g / total for g in gap)
        error = (got - torch.tensor(o["logprobs"])).abs()
        errors.extend(error.tolist())
        unit_errors.extend((error / total).tolist())
        off = torch.nonzero(fused.argmax(-1) != chosen).flatten().tolist()
        divergent.extend(dict(sequence=sequence, position=p, weights=w, gap=gap[p], gap_per_unit_weight=gap[p] / total,
                              reference_best=int(fused[p].argmax()), chosen=o["token_ids"][p],
                              engine_logprob_error=float(error[p])) for p in off)
        exact += int(not off)
    stats = dict(
        tokens=len(gaps), sequences_exact=exact, argmax_divergences=len(divergent),
        max_gap_to_reference_best=max(gaps), max_gap_per_unit_weight=max(scaled),
        max_abs_logprob_error=max(errors), p99_abs_logprob_error=float(np.percentile(errors, 99)),
        max_abs_logprob_error_per_unit_weight=max(unit_errors),
        p99_abs_logprob_error_per_unit_weight=float(np.percentile(unit_errors, 99)),
    )
    return stats, divergent


def component_margins(reference: Any, prompt_ids: list, outputs: list, tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each divergent token: each model's fp32 log-prob margin of the reference's best over the
    engine's choice. The engine can only flip a token when the models' bf16 errors, weighted as in
    the fusion, outweigh the fused margin; the parts say whose error it took."""
    import torch

    explained = []
    for token in tokens:
        prefix = list(prompt_ids[token["sequence"]]) + outputs[token["sequence"]]["token_ids"][: token["position"]]
        base, arms = reference.next_token_logits([prefix])

        def margin(logits: Any) -> float:
            logprobs = torch.log_softmax(logits[0, : reference.vocab_size].float(), dim=-1)
            return float(logprobs[token["reference_best"]] - logprobs[token["chosen"]])

        explained.append(token | {"base_margin": margin(base),
                                  "arm_margins": {d: margin(a) for d, a in zip(reference.dimensions, arms, strict=True)}})
    return explained


def speed(out: Path, pairs: list[str], smoke: bool, only: list[str] | None, runners: list[str]) -> None:
    """Plain vLLM with vLLM's own defaults (base alone, ARM alone: the baseline) and the guided
    engine on each of `runners`, each at batch 1/16/64/256, 256 new tokens, ignore_eos, random
    weights, dummy weights."""
    root = Path(os.environ.get("GENARM_BENCH_MODELS", "/tmp/genarm-bench-models")) / "speed"
    vocab = 512 if smoke else SPEED_VOCAB
    batches = [1, 4] if smoke else BATCHES
    new_tokens = 16 if smoke else NEW_TOKENS
    jobs = []
    names = {p for pair in pairs for p in pair.split("+")}
    for name in sorted(names):
        jobs.append(dict(name=f"plain-{name}-defaults", base=str(speed_model_folder(name, root, vocab))))
    for pair in pairs:
        base, arm = pair.split("+")
        for runner in runners:
            jobs.append(dict(name=f"guided-{pair}-{runner}", base=str(speed_model_folder(base, root, vocab)),
                             arms={"harmless": str(speed_model_folder(arm, root, vocab))}, runner=runner))
    for job in jobs:
        if only and job["name"] not in only:
            continue
        target = out / f"speed-{job['name']}.json"
        if target.exists() and "timings" in json.loads(target.read_text()):
            continue  # resumable across device calls
        job |= dict(kind="speed", vocab=vocab, prompt_len=64, new_tokens=new_tokens, batches=batches,
                    engine_args=engine_args_for(smoke, load_format="dummy", max_model_len=1024))
        run_child(job, target)


def reference_speed(out: Path, pairs: list[str], smoke: bool) -> None:
    """The research-code style baseline: transformers, one KV cache per model, batch 1 and 32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(os.environ.get("GENARM_BENCH_MODELS", "/tmp/genarm-bench-models")) / "speed"
    vocab = 512 if smoke else SPEED_VOCAB
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    results = {}
    for pair in pairs:
        base_name, arm_name = pair.split("+")
        models = []
        for name in (base_name, arm_name):
            config = AutoConfig.from_pretrained(speed_model_folder(name, root, vocab))
            with torch.device(device):
                models.append(AutoModelForCausalLM.from_config(config, dtype=dtype).eval())
        from transformers import DynamicCache

        from server.fusion import fused_logprobs

        for size in ([1, 4] if smoke else [1, 32]):
            new_tokens = 16 if smoke else NEW_TOKENS
            ids = torch.randint(3, vocab, (size, 64), device=device)
            weights = torch.ones(size, 1, device=device)
            with torch.inference_mode():
                for _ in range(2):  # the first pass warms up
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    caches = [DynamicCache() for _ in models]
                    step_ids = ids
                    for _ in range(new_tokens):
                        logits = [m(input_ids=step_ids, past_key_values=c, use_cache=True).logits[:, -1] for m, c in zip(models, caches)]
                        fused = fused_logprobs(logits[0], logits[1:], weights, vocab, validate=False)
                        step_ids = fused.argmax(-1, keepdim=True)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    wall = time.perf_counter() - start
            results[f"{pair}/bs{size}"] = {"wall_s": wall, "tokens_per_s": size * new_tokens / wall}
            print(json.dumps({f"reference {pair}/bs{size}": results[f"{pair}/bs{size}"]}), flush=True)
        del models
        if device == "cuda":
            torch.cuda.empty_cache()
    (out / "reference-speed.json").write_text(json.dumps(results, indent=1))


def report(out: Path, command: str) -> dict[str, Any]:
    """engine.json + engine.md from the phase results; prints the table."""
    def load(name: str) -> dict[str, Any]:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    correct = load("correctness.json")
    ref = load("reference-speed.json")
    lines = ["| runner | pair | batch | guided tok/s | base alone (vLLM defaults) tok/s | ARM alone (vLLM defaults) tok/s | ideal tok/s | guided / ideal | guided / base alone |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for path in sorted(out.glob("speed-guided-*.json")):
        guided = json.loads(path.read_text())
        pair, runner = guided["job"]["name"].removeprefix("guided-").rsplit("-", 1)
        base, arm = pair.split("+")
        base_run, arm_run = load(f"speed-plain-{base}-defaults.json"), load(f"speed-plain-{arm}-defaults.json")
        for size, timing in guided.get("timings", {}).items():
            if size not in base_run.get("timings", {}) or size not in arm_run.get("timings", {}):
                continue
            b, a = base_run["timings"][size], arm_run["timings"][size]
            # Ideal: the guided step costs exactly one base step plus one ARM step.
            ideal = b["tokens_per_s"] / (1 + a["wall_s"] / b["wall_s"])
            ratio = timing["tokens_per_s"] / ideal
            ratios[f"{pair}/bs{size}/{runner}"] = round(ratio, 3)
            rows.append({"runner": guided.get("model_runner") or runner, "baseline_runner": base_run.get("model_runner"),
                         "async_scheduling": guided.get("async_scheduling"),
                         "pair": pair, "batch": int(size), "guided_tokens_per_s": timing["tokens_per_s"],
                         "base_tokens_per_s": b["tokens_per_s"], "arm_tokens_per_s": a["tokens_per_s"],
                         "ideal_tokens_per_s": ideal, "guided_over_ideal": ratio,
                         "guided_over_base": timing["tokens_per_s"] / b["tokens_per_s"]})
            lines.append(f"| {rows[-1]['runner']} | {pair} | {size} | {timing['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} "
                         f"({rows[-1]['baseline_runner']}) | {a['tokens_per_s']:.0f} | {ideal:.0f} | {ratio:.2f} | "
                         f"{timing['tokens_per_s'] / b['tokens_per_s']:.2f} |")
    for key, value in ref.items():
        pair, size = key.split("/bs")
        runs = sorted(out.glob(f"speed-guided-{pair}-*.json"))
        guided = json.loads(runs[-1].read_text()).get("timings", {}) if runs else {}
        note = ""
        if size in guided:
            note = f" (guided vLLM at bs{size}: {guided[size]['tokens_per_s']:.0f} tok/s, {guided[size]['tokens_per_s'] / value['tokens_per_s']:.1f}x)"
        lines.append(f"| {pair} | {size} | reference decoder (transformers, KV cache): {value['tokens_per_s']:.0f} tok/s{note} | | | | | | |")
    # The machine that ran the engines (the report may run elsewhere): recorded by each job.
    jobs = [json.loads(path.read_text()) for path in out.glob("*.json")]
    machines = sorted({(job["device"], job["vllm"]) for job in jobs if "job" in job and job.get("device")})
    device = "; ".join(d for d, _ in machines) or "unknown"
    vllm_version = "; ".join(v for _, v in machines) or None
    result = {
        "correctness_criterion": CRITERION,
        "within_plain_deviation": bool(correct) and all(e.get("within_plain_deviation") for e in correct.values()),
        "zero_weight_matches_plain_vllm": bool(correct) and all(e.get("zero_weight_matches_plain_vllm") for e in correct.values()),
        "mixed_geometry_ok_gpu": bool(correct) and all("error" not in e for e in correct.values()),
        "ratio_to_ideal": ratios,
        "speed": rows,
        "correctness": correct,
        "reference_decoder": ref,
        "device": device,
        "vllm": vllm_version,
        "command": command,
    }
    (out / "engine.json").write_text(json.dumps(result, indent=1))
    table = "\n".join(lines)
    (out / "engine-table.md").write_text(table + "\n")
    print(table)
    print(json.dumps({k: result[k] for k in ("within_plain_deviation", "zero_weight_matches_plain_vllm", "mixed_geometry_ok_gpu")}))
    return result


CRITERION = ("bf16 greedy, every token teacher-forced through the fp32 reference: each guided token's gap to the "
             "reference's best / (1 + sum |w|) <= plain vLLM's largest gap on the same prompts (same run, same TP); "
             "zero weights == plain vLLM token for token")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["correctness", "speed", "reference-speed", "report", "explain"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "artifacts/engine")))
    parser.add_argument("--pairs", nargs="+", default=["1b+1b", "8b+1b"])
    parser.add_argument("--only", nargs="*", help="speed: run only these job names")
    parser.add_argument("--families", nargs="*", default=["llama", "qwen2"], help="correctness: random families")
    parser.add_argument("--tp", type=int, default=1, help="correctness: tensor-parallel size")
    parser.add_argument("--runner", choices=RUNNERS, help="correctness: the guided engine's model runner (default: the platform's)")
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS), help="speed: guided engine on each")
    parser.add_argument("--arm-roles", nargs="+", choices=["same", "other"], default=["same", "other"],
                        help="correctness: which of a family's ARMs guide (same geometry as the base, other, both)")
    parser.add_argument("--plain-twice", action="store_true",
                        help="correctness: a second plain engine, freshly compiled: how far plain vLLM reproduces itself")
    parser.add_argument("--real-base", help="correctness: also a real base (HF folder) ...")
    parser.add_argument("--real-arm", nargs="*", default=[], help="... with these ARMs, NAME=PATH (adapters merged)")
    parser.add_argument("--label", help="explain: the pair's label in its file names, e.g. real-v2")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(NO_MULTICAST)
    if args.phase == "correctness":
        real = (args.real_base, dict(a.split("=", 1) for a in args.real_arm)) if args.real_base else None
        correctness(args.out, args.smoke, args.families, args.tp, real, args.runner, tuple(args.arm_roles), args.plain_twice)
    elif args.phase == "speed":
        speed(args.out, args.pairs, args.smoke, args.only, args.runners)
    elif args.phase == "reference-speed":
        reference_speed(args.out, args.pairs, args.smoke)
    elif args.phase == "explain":
        explain(args.out, args.label, args.tp, args.real_base, dict(a.split("=", 1) for a in args.real_arm))
        return
    report(args.out, " ".join(["python -m bench.engine_gpu", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
