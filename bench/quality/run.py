"""The quality experiment: does GenARM guidance align, and at what price?

    python -m bench.quality.run --config bench/quality/configs/smollm2_hh.yaml --out bench/quality/
    python -m bench.quality.run --smoke --out /tmp/quality-smoke         # tiny random models, minutes
    ... --stages judge,positive                                          # only some stages

Stages (each caches its outputs under the config's workdir, so a rerun only does what is missing):
  judge     train the held-out judge RM on the ARM's train split (judges.py)
  positive  build the 'positive' ARM: two base samples per TRAIN prompt, VADER-labelled pairs, genarm-train
  generate  vLLM: base (sampled, greedy), best-of-N pools, GenARM at several weights (guided engine),
            the ARM sampling on its own
  args      ARGS on the transformers reference decoder, with reference-decoder timings of base and GenARM
  multi     the guided engine with both ARMs, weights on a grid
  report    judges, drift, win rates, timings -> results.json, results.md, plots
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.quality.config import ExperimentConfig, smoke_config  # noqa: E402
from bench.quality.data import SplitData, SplitSettings, TextPair, load_split, split_settings_of_arm  # noqa: E402
from bench.quality.progress import log, wkey  # noqa: E402
from bench.vllm_worker import run_engine_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("judge", "positive", "generate", "args", "multi", "report")


def sha256_of_folder(folder: Path, patterns: tuple[str, ...] = ("*.safetensors",)) -> dict[str, str]:
    from genarm_common.model_fetch import sha256_file

    files = sorted(p for pattern in patterns for p in folder.glob(pattern) if p.is_file())
    return {p.name: sha256_file(p) for p in files}


class Experiment:
    def __init__(self, cfg: ExperimentConfig, out: Path, command: str, nice: int | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.work = Path(cfg.workdir).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.nice = cfg.nice if nice is None else nice
        import torch

        torch.set_num_threads(cfg.threads)
        self._split: SplitData | None = None
        self._tokenizer = None
        self._judge = None
        self._embedder = None
        self._paths: dict[str, Path] = {}

    # ------------------------------------------------------------------ models, data, judge

    def base_path(self) -> Path:
        if "base" not in self._paths:
            path = Path(self.cfg.base).expanduser()
            if not path.is_dir():
                from genarm_common.model_fetch import fetch_model

                path = fetch_model(self.cfg.base)
            self._paths["base"] = path.resolve()
        return self._paths["base"]

    def arm_source(self, name: str) -> Path:
        if name == "positive" and name not in self.cfg.arms:
            return self.positive_arm_source()
        return Path(self.cfg.arms[name]).expanduser()

    def arm_path(self, name: str) -> Path:
        """An HF folder for the ARM: adapters are merged onto the base once (server.adapters cache)."""
        if name not in self._paths:
            source = self.arm_source(name)
            from server.adapters import is_adapter, merge_adapter

            self._paths[name] = Path(merge_adapter(source, str(self.base_path()))) if is_adapter(source) else source
        return self._paths[name]

    def positive_arm_source(self) -> Path:
        if self.cfg.positive.arm:
            return Path(self.cfg.positive.arm).expanduser()
        return self.positive_dir() / "adapter"

    def positive_dir(self) -> Path:
        return Path(self.cfg.positive.out).expanduser() if self.cfg.positive.out else self.work / "positive-arm"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_path())
        return self._tokenizer

    def split_settings(self) -> SplitSettings:
        source = Path(self.cfg.arms[self.cfg.split_from]).expanduser()
        try:
            settings = split_settings_of_arm(source)
        except FileNotFoundError:
            settings = SplitSettings(recorded_in="experiment config (the ARM recorded no split)")
        for key, value in (self.cfg.split or {}).items():
            setattr(settings, key, value)
        return settings

    @property
    def split(self) -> SplitData:
        if self._split is None:
            self._split = load_split(self.tokenizer, self.split_settings(), self.cfg.max_records)
        return self._split

    def eval_prompts(self, n: int | None = None) -> list[TextPair]:
        prompts = self.split.prompts("heldout", self.cfg.n_prompts)
        if len(prompts) < self.cfg.n_prompts:
            log(f"only {len(prompts)} held-out prompts (asked for {self.cfg.n_prompts})")
        return prompts[:n] if n is not None else prompts

    @property
    def embedder(self):
        if self._embedder is None:
            from bench.quality.judges import Embedder

            self._embedder = Embedder()
            self._embedder.model.max_seq_length = self.cfg.judge.max_seq_length
            self._embedder.load_cache(self.work / "embeddings.npz")
        return self._embedder

    def save_embeddings(self) -> None:
        if self._embedder is not None:
            self._embedder.save_cache(self.work / "embeddings.npz")

    def judge(self):
        if self._judge is None:
            from bench.quality.judges import RewardJudge

            path = self.work / "judge_rm"
            if not path.with_suffix(".json").is_file():
                self.stage_judge()
            self._judge = RewardJudge.load(path, self.embedder)
        return self._judge

    def engine_job(self, name: str, model: Path, arms: dict[str, Path] | None, tasks: list[dict]) -> dict:
        job = {
            "engine": {"model": str(model), "arms": {k: str(v) for k, v in (arms or {}).items()} or None,
                       "engine_args": self.cfg.engine_args},
            "tasks": tasks,
        }
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_gib)
        load_before = os.getloadavg()
        started = time.monotonic()
        log(f"engine job {name}: {len(tasks)} task(s) on {model.name}" + (f" + ARMs {list(arms)}" if arms else ""))
        result = run_engine_job(job, self.work / "jobs", name, nice=self.nice, threads=self.cfg.threads)
        if "loadavg_before" not in result:  # a fresh run (not reused from the cache): record the machine load
            result["loadavg_before"] = load_before
            result["loadavg_after"] = os.getloadavg()
            result["job_wall_s"] = time.monotonic() - started
            (self.work / "jobs" / f"{name}.result.json").write_text(json.dumps(result))
        return result

    def task(self, name: str, prompts: list[TextPair], n: int = 1, temperature: float | None = None,
             weights: dict[str, float] | None = None, seed: int | None = None) -> dict:
        t = self.cfg.temperature if temperature is None else temperature
        return {"name": name, "prompt_ids": [p.prompt_ids for p in prompts], "n": n, "temperature": t,
                "seed": (self.cfg.seed if seed is None else seed) if t > 0 else None,
                "max_tokens": self.cfg.max_new_tokens, "weights": weights}

    # ------------------------------------------------------------------ stages

    def stage_judge(self) -> None:
        from bench.quality.judges import RewardJudge, train_reward_judge

        path = self.work / "judge_rm"
        train = self.split.train
        if self.cfg.judge.max_train_pairs:
            train = train[: self.cfg.judge.max_train_pairs]
        wanted = {"features": list(self.cfg.judge.features), "c_grid": list(self.cfg.judge.c_grid),
                  "train_pairs": len(train), "max_seq_length": self.cfg.judge.max_seq_length,
                  "split_sha256": hashlib.sha256(json.dumps(
                      [[p.index for p in train], [p.index for p in self.split.heldout]]).encode()).hexdigest()}
        if path.with_suffix(".json").is_file():
            meta = RewardJudge.load(path).meta
            if meta.get("settings") == wanted:
                log(f"judge RM: cached ({path}), held-out accuracy {meta['heldout_accuracy']:.3f}")
                return
        log(f"judge RM: training on {len(train)} train pairs (embedding them once; cached)")
        judge = train_reward_judge(self.embedder, train, self.split.heldout, self.cfg.judge.features,
                                   self.cfg.judge.c_grid)
        judge.meta["settings"] = wanted
        judge.save(path)
        self.save_embeddings()
        self._judge = None
        log(f"judge RM: feature {judge.feature}, C {judge.meta['C']}, CV accuracy "
            f"{max(max(v.values()) for v in judge.meta['cv_accuracy'].values()):.3f}, held-out accuracy "
            f"{judge.meta['heldout_accuracy']:.3f} ({judge.meta['heldout_pairs']} pairs)")

    def stage_positive(self) -> None:
        if not (self.cfg.positive.enabled and self.cfg.multi):
            return
        if self.cfg.positive.arm:
            log(f"positive ARM given: {self.cfg.positive.arm}")
            return
        adapter = self.positive_dir() / "adapter"
        if (adapter / "adapter_config.json").is_file():
            log(f"positive ARM: cached ({adapter})")
            return
        from bench.quality.judges import sentiment
        from bench.quality.methods import vader_pairs

        prompts = self.split.prompts("train", self.cfg.positive.train_prompts)
        result = self.engine_job("positive_data", self.base_path(), None, [
            self.task("positive_samples", prompts, n=2, temperature=self.cfg.positive.temperature,
                      seed=self.cfg.seed + 7_000_000)])
        samples = [[s["text"] for s in per] for per in result["tasks"][0]["samples"]]
        records, report = vader_pairs(prompts, samples, sentiment, self.cfg.positive.min_gap)
        data_file = self.work / "positive_pairs.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        report.update({"sampling": f"2 base samples per train prompt, T={self.cfg.positive.temperature}, "
                                   f"{self.cfg.max_new_tokens} new tokens", "file": str(data_file)})
        (self.work / "positive_pairs.report.json").write_text(json.dumps(report, indent=1) + "\n")
        log(f"positive pairs: {report['pairs']} of {report['prompts']} train prompts "
            f"({report['skipped_ties']} ties skipped)")
        out = self.positive_dir()
        cmd = [sys.executable, "-m", "rm_training.cli", "--model", str(self.base_path()), "--data", str(data_file),
               "--data-format", "pairs", "--dimension", "positive", "--out", str(out),
               *self.cfg.positive.train_args]
        if (out / "checkpoints").is_dir():
            cmd.append("--resume")
        if self.nice:
            cmd = ["nice", "-n", str(self.nice), *cmd]
        log("training the positive ARM: " + shlex.join(cmd))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(self.cfg.threads)}
        started = time.monotonic()
        with open(self.work / "positive_train.log", "w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"genarm-train failed; see {self.work / 'positive_train.log'}")
        (self.work / "positive_train.json").write_text(json.dumps(
            {"command": shlex.join(cmd), "wall_s": time.monotonic() - started}, indent=1) + "\n")
        log(f"positive ARM trained in {time.monotonic() - started:.0f} s: {adapter}")

    def stage_generate(self) -> None:
        cfg = self.cfg
        prompts = self.eval_prompts()
        base_tasks = [self.task("base", prompts)]
        if 0.0 in cfg.greedy_weights:
            base_tasks.append(self.task("base_greedy", prompts, temperature=0.0))
        base_tasks += [self.task(f"base_t{wkey(t)}", prompts, temperature=t) for t in cfg.temperature_controls]
        base_tasks += [self.task(f"pool_{n}", prompts, n=n) for n in cfg.best_of]
        self.engine_job("base", self.base_path(), None, base_tasks)
        arms = {name: self.arm_path(name) for name in cfg.arms}
        guided = []
        weights = sorted(set(cfg.genarm_weights) | ({0.0} if cfg.check_zero_weight else set()))
        for w in weights:
            guided.append(self.task(f"genarm_w{wkey(w)}", prompts, weights={cfg.split_from: w}))
        for w in cfg.greedy_weights:
            if w != 0.0:
                guided.append(self.task(f"genarm_w{wkey(w)}_greedy", prompts, temperature=0.0,
                                        weights={cfg.split_from: w}))
        self.engine_job("guided", self.base_path(), arms, guided)
        if cfg.arm_alone:
            self.engine_job("arm_alone", self.arm_path(cfg.split_from), None, [self.task("arm_alone", prompts)])

    def stage_args(self) -> None:
        import torch

        from bench.quality.methods import args_decode, load_causal_lm

        cfg = self.cfg
        out_file = self.work / "args.json"
        prompts = self.eval_prompts(cfg.args.n_prompts)
        wanted = {"weight": cfg.args.weight, "extra_weights": list(cfg.args.extra_weights),
                  "top_k": cfg.args.top_k, "n_prompts": len(prompts),
                  "max_tokens": cfg.max_new_tokens, "batch_size": cfg.args.batch_size,
                  "judge": self.judge().meta.get("settings")}
        if out_file.is_file() and json.loads(out_file.read_text()).get("settings") == wanted:
            log("ARGS: cached")
            return
        model, tokenizer = load_causal_lm(str(self.base_path()), getattr(torch, cfg.reference_dtype))
        judge = self.judge()
        ids = [p.prompt_ids for p in prompts]
        users = [p.last_user for p in prompts]
        results: dict[str, Any] = {"settings": wanted, "loadavg_before": os.getloadavg(), "runs": {}}
        for i, w in enumerate([cfg.args.weight, *cfg.args.extra_weights]):
            name = "args" if i == 0 else f"args_w{wkey(w)}"
            log(f"{name}: {len(prompts)} prompts, top-{cfg.args.top_k}, w={w} (reference decoder)")
            run = args_decode(model, tokenizer, ids, users, lambda u, t: judge.score(u, t, cache=False),
                              w, cfg.args.top_k, cfg.max_new_tokens, cfg.args.batch_size)
            results["runs"][name] = run.__dict__ | {"weight": w}
            log(f"{name}: {run.wall_s:.0f} s (LM {run.lm_s:.0f} s, judge {run.judge_s:.0f} s, "
                f"{run.judge_calls} judge calls)")
        zero = args_decode(model, tokenizer, ids, users, lambda u, t: np.zeros(len(t)), 0.0, 1,
                           cfg.max_new_tokens, cfg.args.batch_size)
        results["runs"]["base_greedy_reference"] = zero.__dict__
        log(f"reference base greedy: {zero.wall_s:.0f} s")
        del model
        if cfg.args.reference_genarm_weight is not None:
            from server.reference import ReferenceGuidedGenerator, SamplingOptions

            ref = ReferenceGuidedGenerator(self.base_path(), {cfg.split_from: self.arm_path(cfg.split_from)},
                                           dtype=getattr(torch, cfg.reference_dtype))
            w = cfg.args.reference_genarm_weight
            started = time.monotonic()
            token_ids: list[list[int]] = []
            texts: list[str] = []
            for lo in range(0, len(ids), cfg.args.batch_size):
                chunk = ids[lo:lo + cfg.args.batch_size]
                gens = ref.generate(chunk, [{cfg.split_from: w}] * len(chunk),
                                    SamplingOptions(max_tokens=cfg.max_new_tokens, temperature=0.0))
                token_ids += [g.token_ids for g in gens]
                texts += [g.text for g in gens]
            wall = time.monotonic() - started
            results["runs"][f"genarm_w{wkey(w)}_greedy_reference"] = {
                "token_ids": token_ids, "texts": texts, "wall_s": wall, "finish_reasons": []}
            log(f"reference GenARM w={w} greedy: {wall:.0f} s")
        results["loadavg_after"] = os.getloadavg()
        out_file.write_text(json.dumps(results))

    def stage_multi(self) -> None:
        cfg = self.cfg
        if not cfg.multi:
            return
        arms = {name: self.arm_path(name) for name in cfg.multi.grid}
        prompts = self.eval_prompts(cfg.multi.n_prompts)
        (d1, g1), (d2, g2) = list(cfg.multi.grid.items())
        tasks = [self.task(f"multi_{d1}{wkey(a)}_{d2}{wkey(b)}", prompts, weights={d1: a, d2: b})
                 for a in g1 for b in g2]
        self.engine_job("multi", self.base_path(), arms, tasks)

    def stage_report(self) -> None:
        from bench.quality.report import build_report

        build_report(self)

    # ------------------------------------------------------------------ setup record

    def setup_record(self) -> dict[str, Any]:
        import torch
        import transformers

        from bench.quality.judges import judge_versions, package_version
        from genarm_common.model_fetch import sha256_file

        def model_record(path: Path, source: Path | None = None) -> dict[str, Any]:
            rec: dict[str, Any] = {"path": str(path), "sha256": sha256_of_folder(path)}
            provenance = path / "genarm_source.json"
            if provenance.is_file():
                rec["provenance"] = json.loads(provenance.read_text())
            if source is not None and source != path:
                rec["adapter"] = str(source)
                rec["adapter_sha256"] = sha256_of_folder(source, ("adapter_model.safetensors", "adapter_config.json"))
                info = source / "genarm_arm.json"
                if info.is_file():
                    arm = json.loads(info.read_text())
                    rec["trained"] = {k: arm.get(k) for k in ("command", "metrics", "beta_r", "mode", "lora")}
            return rec

        arms = {name: model_record(self.arm_path(name), self.arm_source(name)) for name in self.cfg.arms}
        if self.cfg.multi and "positive" in self.cfg.multi.grid and (self.positive_arm_source().exists()):
            arms["positive"] = model_record(self.arm_path("positive"), self.positive_arm_source())
            report = self.work / "positive_pairs.report.json"
            if report.is_file():
                arms["positive"]["pairs"] = json.loads(report.read_text())
        split = self.split
        settings = split.settings
        from rm_training.preference_data import resolve_source

        data_file = Path(resolve_source(settings.source))
        prompts = self.eval_prompts()
        judge = self.judge()
        return {
            "command": self.command,
            "config": self.cfg.to_dict(),
            "models": {"base": model_record(self.base_path()), "arms": arms},
            "data": {
                "source": settings.source, "file": str(data_file.relative_to(ROOT)) if data_file.is_relative_to(ROOT) else str(data_file),
                "sha256": sha256_file(data_file),
                "split": {**settings.to_dict(), "train_pairs": len(split.train), "heldout_pairs": len(split.heldout),
                          "rule": "held out iff sha256(split_seed, prompt) < heldout_fraction "
                                  "(rm_training.preference_data, as the ARM's training run)"},
            },
            "prompts": {
                "n": len(prompts), "side": "held-out",
                "which": "the first n distinct held-out prompts in file order; full dialogue up to the last "
                         "Assistant turn, rendered with the base's chat template (oldest turns dropped to fit "
                         f"{settings.max_prompt_length} tokens), as the ARM trainer renders them",
                "record_indices": [p.index for p in prompts],
            },
            "generation": {"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                           "seed": self.cfg.seed, "seed_rule": "prompt b uses seed + 100*b; the i-th of n samples +i"},
            "judges": {
                "judge_rm": {k: v for k, v in judge.meta.items() if k != "train_indices"} | {"feature": judge.feature},
                "profanity": "alt-profanity-check 1.9.1 predict_prob (P(offensive)) of the response text",
                "sentiment": "vaderSentiment 3.3.2 compound score of the response text, in [-1, 1]",
                "drift": "mean over outputs of the mean per-token log pi_base(y_t | x, y_<t), teacher-forced "
                         f"through the base in transformers ({self.cfg.reference_dtype})",
                "versions": judge_versions(),
            },
            "machine": {
                "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                "torch": torch.__version__, "transformers": transformers.__version__, "vllm": package_version("vllm"),
                "note": "CPU only; a concurrent ARM training run may have shared the cores (see loadavg per job)",
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.quality.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment YAML (bench/quality/configs/*.yaml)")
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline on tiny random models")
    parser.add_argument("--out", required=True, help="where results.json, results.md and the plots go")
    parser.add_argument("--workdir", help="override the config's workdir (intermediate files)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--nice", type=int, help="niceness of the heavy child processes (default: the config's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.smoke:
        from tests.tiny_family import build_tiny_family

        workdir = Path(args.workdir or out / "work")
        tiny_dir = workdir / "tiny"
        if (tiny_dir / "llama-base" / "config.json").is_file():
            tiny = {p.name: p for p in tiny_dir.iterdir() if p.is_dir()}
        else:
            tiny = build_tiny_family(tiny_dir)
        cfg = smoke_config(tiny, workdir)
    elif args.config:
        cfg = ExperimentConfig.load(args.config)
        if args.workdir:
            cfg.workdir = args.workdir
    else:
        parser.error("--config or --smoke is needed")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}")
    command = "python -m bench.quality.run " + shlex.join(argv)
    exp = Experiment(cfg, out, command, args.nice)
    started = time.monotonic()
    for stage in STAGES:
        if stage in stages:
            t0 = time.monotonic()
            getattr(exp, f"stage_{stage}")()
            log(f"stage {stage} done in {time.monotonic() - t0:.0f} s")
    exp.save_embeddings()
    log(f"all done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
