"""Does a shrunk ARM still steer like the one it came from? Full and rank-truncated ARMs side by side.

    python -m bench.arm_rank --gold-work WORK --rank 8 --arm positive=RANK16_ADAPTER \
        --arm objective=RANK16_ADAPTER --out bench/results/arm_rank_cpu

WORK is a gold experiment's work folder (`bench/gold/run.py`): its held-out prompts (prompts.json)
and held-out gold pairs (pairs/DIM_heldout.jsonl). Each ARM is shrunk with `rm_training.shrink`,
then both versions are measured in the same run:
- held-out pairwise accuracy on the gold pairs (rm_training.scoring, float32);
- one guided engine per dimension holding its full and shrunk ARM, sampling the held-out prompts at
  T=1 with the same seeds per weight: gold (the dimension's judge), KL(pi || base) per response (engine log-probs
  minus the teacher-forced base's), the guards (MiniLM relevance, distinct-2);
- KL(pi_full || pi_shrunk) per response: the full ARM's samples, scored by both fused distributions.
Results go to OUT.json and a table to OUT.md. Resumable: the engine job is cached in --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.gold.judges import Relevance, distinct2, gold

# Chunked prefill off: vLLM 0.32 CPU crashes when it splits the prompt of a seeded request
# ("CPU Generator does not use offset"), and every request here is seeded.
ENGINE_ARGS = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 256, "enable_prefix_caching": True,
               "enable_chunked_prefill": False, "max_num_batched_tokens": 8192,
               "seed": 0, "enforce_eager": True}


def heldout_accuracy(arm: str, pairs_file: Path, tokenizer: Any, max_length: int, max_prompt_length: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from rm_training.preference_data import PairEncoder, encode_source
    from rm_training.scoring import score_pairs

    pairs, _ = encode_source(str(pairs_file), PairEncoder(tokenizer, max_length, max_prompt_length, True, None))
    model = AutoModelForCausalLM.from_pretrained(arm, dtype=torch.float32)
    with torch.inference_mode():
        return score_pairs(model, pairs, tokenizer.pad_token_id or tokenizer.eos_token_id).accuracy


def mean_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gold-work", required=True, type=Path)
    parser.add_argument("--arm", action="append", required=True, help="DIM=ADAPTER_DIR (a LoRA adapter)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--prompts", type=int, default=250)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM's CPU KV cache, per engine")
    parser.add_argument("--work", type=Path, default=Path("/tmp/genarm-arm-rank"))
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from bench.gold.teacher import load_model, teacher_force
    from bench.vllm_worker import run_engine_job
    from genarm_common.model_fetch import resolve_model_ref
    from rm_training.shrink import shrink_adapter
    from server.adapters import resolve_arms

    started = time.monotonic()
    base = resolve_model_ref(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapters = dict(item.split("=", 1) for item in args.arm)
    arms: dict[str, dict[str, Any]] = {}
    for dim, adapter in adapters.items():
        shrunk = args.work / "adapters" / f"{dim}_r{args.rank}"
        report = shrink_adapter(Path(adapter), shrunk, args.rank)
        arm_info = json.loads((Path(adapter) / "genarm_arm.json").read_text())
        data = arm_info["data"]
        merged = resolve_arms(base, {"full": adapter, "shrunk": str(shrunk)})
        arms[dim] = {"shrink": report.as_dict(), "full": merged["full"], "shrunk": merged["shrunk"], "accuracy": {}}
        for version in ("full", "shrunk"):
            # Cached by the merged folder, whose name is a digest of the adapter's files.
            cached = args.work / "accuracy" / f"{Path(merged[version]).name}.json"
            if not cached.is_file():
                cached.parent.mkdir(parents=True, exist_ok=True)
                value = heldout_accuracy(merged[version], args.gold_work / "pairs" / f"{dim}_heldout.jsonl",
                                         tokenizer, data["max_length"], data["max_prompt_length"])
                cached.write_text(json.dumps(value))
            arms[dim]["accuracy"][version] = json.loads(cached.read_text())
        print(f"{dim}: held-out accuracy {arms[dim]['accuracy']}", flush=True)

    heldout = json.loads((args.gold_work / "prompts.json").read_text())["heldout"][:args.prompts]
    prompt_ids = [p["ids"] for p in heldout]

    def task(name: str, weights: dict[str, float]) -> dict[str, Any]:
        return {"name": name, "prompt_ids": prompt_ids, "n": 1, "temperature": 1.0, "seed": args.seed,
                "max_tokens": args.max_new_tokens, "logprobs": True, "weights": weights}

    # One engine per dimension (base + full + shrunk ARM): every ARM in an engine runs at every step.
    # The base's own samples (zero weights) come from the first; the same seeds give both versions
    # of an ARM the same random numbers.
    by_name: dict[str, Any] = {}
    for index, dim in enumerate(arms):
        engine_arms = {f"{dim}_{version}": arms[dim][version] for version in ("full", "shrunk")}
        tasks = [task("zero", {name: 0.0 for name in engine_arms})] if index == 0 else []
        tasks += [task(f"{dim}_{version}_w{w:g}", {f"{dim}_{version}": w})
                  for w in args.weights for version in ("full", "shrunk")]
        job = {"engine": {"model": base, "arms": engine_arms, "engine_args": ENGINE_ARGS}, "tasks": tasks}
        result = run_engine_job(job, args.work / "engines", f"arm_rank_{dim}", timeout=6 * 3600,
                                env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)})
        by_name.update({t["name"]: t for t in result["tasks"]})

    base_model = load_model(base, torch.device("cpu"), torch.float32)
    vocab = len(tokenizer)
    relevance = Relevance()
    users = [p["text"] for p in heldout]

    def responses(name: str) -> tuple[list[list[int]], list[np.ndarray], list[str]]:
        samples = [per[0] for per in by_name[name]["samples"]]
        return [s["token_ids"] for s in samples], [np.asarray(s["logprobs"]) for s in samples], [s["text"] for s in samples]

    def measure(name: str, dim: str) -> dict[str, Any]:
        ids, engine_lp, texts = responses(name)
        tf = teacher_force(base_model, [], prompt_ids, ids, vocab, batch_size=32)
        kl = np.asarray([lp.sum() - b.sum() for lp, b in zip(engine_lp, tf.base, strict=True)])
        scores = gold(dim, texts)
        return {"task": name, "tokens_per_s": by_name[name]["tokens_per_s"], "kl": mean_se(kl),
                "gold": mean_se(scores), "relevance": float(relevance(users, texts).mean()),
                "distinct2": float(distinct2(texts).mean()), "gold_values": scores.tolist()}

    rows: dict[str, Any] = {dim: {"zero": measure("zero", dim)} for dim in arms}
    for dim in arms:
        shrunk_model = load_model(arms[dim]["shrunk"], torch.device("cpu"), torch.float32)
        for w in args.weights:
            for version in ("full", "shrunk"):
                rows[dim][f"{version}_w{w:g}"] = measure(f"{dim}_{version}_w{w:g}", dim)
            # KL(pi_full || pi_shrunk): the full ARM's samples under both fused distributions.
            ids, engine_lp, _ = responses(f"{dim}_full_w{w:g}")
            tf = teacher_force(base_model, [shrunk_model], prompt_ids, ids, vocab,
                               weights=np.full((len(ids), 1), w), batch_size=32)
            cross = np.asarray([lp.sum() - f.sum() for lp, f in zip(engine_lp, tf.fused, strict=True)])
            full, shrunk = rows[dim][f"full_w{w:g}"], rows[dim][f"shrunk_w{w:g}"]
            paired = np.asarray(shrunk.pop("gold_values")) - np.asarray(full.pop("gold_values"))
            rows[dim][f"w{w:g}"] = {"kl_full_to_shrunk": mean_se(cross), "gold_shrunk_minus_full": mean_se(paired)}
        rows[dim]["zero"].pop("gold_values", None)
        del shrunk_model

    out = {"command": "python -m bench.arm_rank " + " ".join(sys.argv[1:] if argv is None else argv), "base": args.base, "rank": args.rank,
           "prompts": len(prompt_ids), "max_new_tokens": args.max_new_tokens, "weights": args.weights,
           "engine": {"args": ENGINE_ARGS, "model_runner": result.get("model_runner"),
                      "device": result.get("device"), "vllm": result.get("vllm")},
           "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "arms": {dim: {k: v for k, v in info.items() if k not in ("full", "shrunk")} for dim, info in arms.items()},
           "rows": rows, "wall_s": time.monotonic() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    table = report_table(out)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def machine() -> str:
    import os
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def report_table(out: dict[str, Any]) -> str:
    engine = out["engine"]
    lines = ["# A shrunk ARM against the ARM it came from", "",
             f"Command: `{out['command']}`  ", f"Machine: {out['machine']}; vLLM {engine['vllm']} on {engine['device']} "
             f"(float32, eager, model runner {engine['model_runner']}); {out['date']}; {out['wall_s'] / 60:.0f} minutes.  ",
             f"{out['prompts']} held-out prompts of the gold run, T=1, {out['max_new_tokens']} new tokens, one sample "
             "each, the same seeds for both versions. Gold = the dimension's judge (bench/gold/judges.py); KL = nats "
             "per response; KL(full || shrunk) = the full ARM's samples, log pi_full - log pi_shrunk, summed over "
             "the response; paired = per prompt, shrunk minus full. ± = standard error over prompts.", ""]
    for dim, info in out["arms"].items():
        rows, shrink = out["rows"][dim], info["shrink"]
        acc = info["accuracy"]
        lines += [f"### {dim}: rank {shrink['from_rank']} ({shrink['bytes_before']:,} bytes) vs rank "
                  f"{shrink['to_rank']} ({shrink['bytes_after']:,} bytes), update energy kept "
                  f"{shrink['update_energy_kept']:.1%}", "",
                  f"Held-out pairwise accuracy: full {acc['full']:.3f}, shrunk {acc['shrunk']:.3f}.", "",
                  "| weight | gold full | gold shrunk | shrunk - full (paired) | KL full | KL shrunk | "
                  "KL(full \\|\\| shrunk) | relevance full / shrunk | distinct-2 full / shrunk |",
                  "|---|---|---|---|---|---|---|---|---|"]
        zero = rows["zero"]
        lines.append(f"| 0 | {zero['gold'][0]:.3f} | = | - | 0 | 0 | 0 | {zero['relevance']:.3f} | "
                     f"{zero['distinct2']:.3f} |")
        for w in out["weights"]:
            full, shrunk, pair = rows[f"full_w{w:g}"], rows[f"shrunk_w{w:g}"], rows[f"w{w:g}"]
            lines.append(
                f"| {w:g} | {full['gold'][0]:.3f} ± {full['gold'][1]:.3f} | {shrunk['gold'][0]:.3f} ± {shrunk['gold'][1]:.3f} "
                f"| {pair['gold_shrunk_minus_full'][0]:+.3f} ± {pair['gold_shrunk_minus_full'][1]:.3f} "
                f"| {full['kl'][0]:.1f} | {shrunk['kl'][0]:.1f} | {pair['kl_full_to_shrunk'][0]:.2f} ± {pair['kl_full_to_shrunk'][1]:.2f} "
                f"| {full['relevance']:.3f} / {shrunk['relevance']:.3f} | {full['distinct2']:.3f} / {shrunk['distinct2']:.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
