"""Weak-to-strong on the gold judge (issue 14, item 4): does a small ARM steer a bigger base as well
as an ARM of the base's own size? (The issue names bench/quality/weak_to_strong.py, which holds the
older HH-harmless variant; the gold-judge pipeline lives in bench/gold, so this one does too.)

Roles: the strong base (Qwen2.5-Coder-1.5B-Instruct) samples, and its samples become the gold pairs;
the weak model (Qwen2.5-Coder-0.5B-Instruct, same tokenizer) gives the weak ARM, the DPO expert and
the anti-expert. Pairs come from the strong base's own samples, labelled by the gold judge: the learned
reward sees the distribution of the policy it steers (Gao et al.; the DPO paper's IMDB setup), and the
weak ARM, the strong ARM and the DPO expert all learn from the same pair files, so the comparison
isolates the reward model's size (as the GenARM paper trains both sizes on the same preference data).

Methods, on the held-out prompts at T=1, gold against KL(pi || strong base) as in bench/gold:
  (a) GenARM, the weak ARM guiding the strong base, w in genarm_weights
  (b) GenARM, the strong ARM (LoRA on the base itself) at the same weights
  (c) best-of-N of the strong base, picked by the strong ARM's sequence reward (and by the weak
      ARM's, and by the gold judge: the oracle)
  (d) proxy-tuning (Liu et al. 2024) through the same engine with signed weights: expert = the weak
      model's DPO policy at +alpha, anti-expert = the weak model itself at -alpha. The engine's step
      log_softmax(z_base) + alpha (log p_expert - log p_anti), renormalised, is proxy-tuning's
      softmax(s_base + alpha (s_expert - s_anti)) exactly (per-position constants cancel); the engine's
      weight range (GuidedModelConfig, `--min-weight/--max-weight`) is [-10, 10] by default.
Each guided method runs in an engine of its own, so its tokens/s is its own cost.

Recovery: the share of the strong ARM's gold gain the weak one recovers at matched KL,
(gold_weak - gold_base) / (gold_strong(KL_weak) - gold_base), the strong ARM's curve interpolated
linearly in KL from (0, base) through its weights; standard errors bootstrap over prompts. Cost:
time per token and model weights used per token, relative to the strong ARM's.

    python -m bench.gold.weak_to_strong --smoke --out /tmp/w2s-smoke          # tiny models, CPU, minutes
    python -m bench.gold.weak_to_strong --config bench/gold/configs/qwen_w2s_gpu.yaml \\
        --gguf-parts /tmp/genarm-stage --stages gpu --lanes 2 --deadline 540 --pack --out $OUT  # 2 GPUs, until done
    python -m bench.gold.weak_to_strong --config bench/gold/configs/qwen_w2s_gpu.yaml --workdir WORK \\
        --stages cpu --out bench/gold/weak_to_strong/                                  # here: scores, report
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.gold.config import GoldConfig, smoke_config
from bench.gold.report import BOOTSTRAP, Table, fmt, per_prompt, plot_frontier, read
from bench.gold.run import Experiment, log, main as run_main, read_json, resolved_path, update_json, write_json
from bench.gold.stage import split_file

ROLES = ("strong", "weak")
METHODS = {"strong": "GenARM (strong ARM)", "weak": "GenARM (weak ARM)",
           "proxy": "proxy-tuning (weak DPO expert - weak base)"}
RETURN_BYTES = 15_000_000  # a file coming back from the device is at most 16 MiB
RETURN_FILES, RETURN_TOTAL_BYTES = 8, 60 * 2**20  # and at most 8 files, 64 MiB together


@dataclass
class W2SConfig(GoldConfig):
    name: str = "w2s"
    base: str = "qwen2.5-coder-1.5b-instruct"  # the strong model: samples, pairs, the guided base
    weak: str = "qwen2.5-coder-0.5b-instruct"  # the weak ARM, the DPO expert and the anti-expert
    dimensions: list[str] = field(default_factory=lambda: ["positive"])
    genarm_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    best_of: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    dpo_betas: list[float] = field(default_factory=lambda: [0.1])  # the first one is the expert
    proxy_alphas: list[float] = field(default_factory=lambda: [1.0])  # expert +alpha, anti-expert -alpha
    # Issue 14 item 5, the HH-RLHF harmless ARMs: genarm-train's official LoRA recipe (TrainConfig's
    # defaults) as bench/train_gpu.py ran it on SmolLM2-135M, at the bigger sizes this run stages.
    hh_settings: dict[str, Any] = field(default_factory=lambda: {"per_device_batch_size": 16, "batch_size": 32,
                                                                 "epochs": 1.0, "save_steps": 100000})
    workdir: str = "/tmp/genarm-w2s"


def w2s_smoke_config(tiny: dict[str, Path], workdir: Path) -> W2SConfig:
    """The gold smoke's sizes on the tiny Qwen2 pair: a wider base, a narrower weak model, one tokenizer."""
    gold = smoke_config(tiny, workdir)
    shared = {f.name: getattr(gold, f.name) for f in dataclasses.fields(GoldConfig)}
    hh = {"max_records": 120, "max_steps": 4, "batch_size": 8, "per_device_batch_size": 4, "max_length": 256,
          "max_prompt_length": 128, "eval_steps": 2, "save_steps": 100000, "heldout_fraction": 0.2}
    return W2SConfig(**{**shared, "name": "w2s-smoke", "base": str(tiny["qwen2-base"]), "weak": str(tiny["qwen2-arm"]),
                        "dimensions": ["positive"], "arm_ablations": [], "genarm_weights": [1.0, 4.0],
                        "best_of": [2, 4], "proxy_alphas": [1.0], "hh_settings": hh})


def weights_per_token(folder: str | Path) -> int:
    """Weights a forward uses per token: the stored tensors, plus the output head when it is tied."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    config = json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)
    if config.get("tie_word_embeddings"):
        total += config["vocab_size"] * config["hidden_size"]
    return total


class WeakToStrong(Experiment):
    config_class = W2SConfig
    gpu_stages = ["prompts", "sample", "pairs", "arm_strong", "arm_weak", "dpo",
                  "genarm_weak", "genarm_strong", "genarm_proxy", "teacher", "hh_strong", "hh_weak"]
    # One stage per ARM and per engine, so a 10-minute device call never ends inside a long one.
    # Measured on an H200 (2026-11-30, fp32 training; hh_strong: a guess, it ran out of memory at 16 per device).
    stage_estimate_s = {"prompts": 15, "sample": 170, "pairs": 15, "arm_strong": 330, "arm_weak": 130,
                        "dpo": 75, "genarm_weak": 80, "genarm_strong": 80, "genarm_proxy": 80,
                        "teacher": 120, "hh_strong": 450, "hh_weak": 150, "score": 150, "report": 30}
    # On two GPUs (--lanes 2): the weak side and the teacher on one, the strong side and the HH-RLHF
    # ARMs on the other; prompts, sample and pairs first, alone.
    gpu_lanes = [["arm_weak", "dpo", "genarm_weak", "genarm_proxy", "teacher"],
                 ["arm_strong", "genarm_strong", "hh_strong", "hh_weak"]]
    stage_requires = {"genarm_weak": ["arm_weak"], "genarm_strong": ["arm_strong"], "genarm_proxy": ["dpo"],
                      "teacher": ["arm_weak", "arm_strong", "genarm_weak", "genarm_strong", "genarm_proxy"]}
    cfg: W2SConfig

    @staticmethod
    def smoke_config(work: Path) -> W2SConfig:
        from tests.tiny_family import build_tiny_family

        return w2s_smoke_config(build_tiny_family(work / "tiny"), work)

    @staticmethod
    def use_gguf_parts(cfg: GoldConfig, parts: list[Path], work: Path) -> None:
        from bench.gold.stage import model_from_parts

        assert isinstance(cfg, W2SConfig)
        cfg.base = str(model_from_parts(cfg.base, parts, work))
        cfg.weak = str(model_from_parts(cfg.weak, parts, work))

    def __init__(self, cfg: W2SConfig) -> None:
        super().__init__(cfg)

    @property
    def dim(self) -> str:
        return self.cfg.dimensions[0]

    @functools.cached_property
    def weak_path(self) -> str:
        return resolved_path(self.cfg.weak)

    @property
    def tokenizer(self) -> Any:
        """The base's tokenizer, kept in the work folder: the CPU stages need it, not the 1.5B model."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            saved = self.path("tokenizer")
            if not (saved / "tokenizer_config.json").is_file():
                AutoTokenizer.from_pretrained(self.base_path).save_pretrained(saved)
            self._tokenizer = AutoTokenizer.from_pretrained(saved)
        return self._tokenizer

    @property
    def vocab(self) -> int:
        from genarm_common.model_checks import check_model_folder, fused_vocab_size

        folders = [check_model_folder("base", self.base_path), check_model_folder("weak", self.weak_path)]
        return fused_vocab_size(self.tokenizer, folders)

    def dpo_model(self) -> str:
        return self.weak_path

    # ------------------------------------------------------------------ ARMs: one stage each
    def _arm(self, role: str, model: str) -> None:
        info = self._train_arm(self.dim, self.cfg.arm_recipe, model=model, role=role)
        update_json(self.path("arms.json"), lambda arms: arms.__setitem__(role, info))

    def stage_arm_strong(self) -> None:
        self._arm("strong", self.base_path)

    def stage_arm_weak(self) -> None:
        self._arm("weak", self.weak_path)

    # ------------------------------------------------------------------ HH-RLHF harmless ARMs (item 5)
    def _hh_arm(self, role: str, model: str) -> None:
        """An ARM on the bundled HH-RLHF harmless pairs (the GenARM paper's data, genarm-train's own
        held-out split): SmolLM2-135M learned nothing there (bench/train_gpu.py run: 0.567 -> 0.558);
        does a 0.5B or a 1.5B ARM?"""
        from rm_training.config import TrainConfig
        from rm_training.pipeline import train_arm

        out = self.path(f"hh/{role}")
        if out.exists():
            shutil.rmtree(out)
        tc = TrainConfig(model=model, data="builtin:hh-rlhf", dimension="harmless", out=str(out), mode="lora",
                         merge=False, progress=False, command="python -m bench.gold.weak_to_strong (stage hh)",
                         **self.cfg.hh_settings)
        started = time.monotonic()
        result = train_arm(tc)
        evals = [e["eval_accuracy"] for e in result.log_history if "eval_accuracy" in e]
        entry = {"model": model, "settings": self.cfg.hh_settings, "recipe": "genarm-train LoRA defaults",
                 "heldout_accuracy_untrained": evals[0] if evals else None,
                 "heldout_accuracy": result.metrics.get("heldout_accuracy"),
                 "heldout_margin": result.metrics.get("heldout_margin"),
                 "train_pairs": result.data_report["split"]["train_pairs"],
                 "heldout_pairs": result.metrics.get("heldout_pairs"), "train_s": time.monotonic() - started}
        update_json(self.path("hh_arms.json"), lambda done: done.__setitem__(role, entry))
        log(f"hh {role}: held-out accuracy {entry['heldout_accuracy_untrained']} -> {entry['heldout_accuracy']}")

    def stage_hh_strong(self) -> None:
        self._hh_arm("strong", self.base_path)

    def stage_hh_weak(self) -> None:
        self._hh_arm("weak", self.weak_path)

    # ------------------------------------------------------------------ guided engines: one stage each
    def engine_spec(self, engine: str) -> tuple[dict[str, str], list[tuple[str, dict[str, float]]]]:
        """An engine's ARMs and its tasks (name, weights); the zero-weight task is the engine check."""
        if engine in ROLES:
            arms = {engine: read_json(self.path("arms.json"))[engine]["merged"]}
            return arms, [(f"{engine}_w{w:g}", {engine: w}) for w in [0.0, *self.cfg.genarm_weights]]
        expert = read_json(self.path("dpo.json"))[f"{self.cfg.dpo_betas[0]:g}"]["merged"]
        arms = {"expert": expert, "anti": self.weak_path}
        return arms, [(f"proxy_a{a:g}", {"expert": a, "anti": -a}) for a in [0.0, *self.cfg.proxy_alphas]]

    def _genarm(self, engine: str) -> None:
        arms, spec = self.engine_spec(engine)
        tasks = [self.heldout_task(name, weights=weights) for name, weights in spec]
        result = self.engine_job(f"genarm_{engine}", arms, tasks)
        for task, (_, weights) in zip(result["tasks"], spec, strict=True):
            task.update(engine=engine, weights=weights)
        models = {"base": self.base_path, **arms}
        info = {"arms": arms, "startup_s": result["startup_s"],
                "weights_per_token": {k: weights_per_token(p) for k, p in models.items()}}

        def add(done: dict[str, Any]) -> None:
            done["tasks"] = [t for t in done.get("tasks", []) if t["engine"] != engine] + result["tasks"]
            done.setdefault("engines", {})[engine] = info

        update_json(self.path("genarm.json"), add)
        log(f"genarm {engine}: " + ", ".join(f"{t['name']} {t['tokens_per_s']:.0f} tok/s" for t in result["tasks"]))

    def stage_genarm_weak(self) -> None:
        self._genarm("weak")

    def stage_genarm_strong(self) -> None:
        self._genarm("strong")

    def stage_genarm_proxy(self) -> None:
        self._genarm("proxy")

    # ------------------------------------------------------------------ teacher forcing (fp32)
    def stage_teacher(self) -> None:
        """Each ARM's sequence reward of the pool (best-of-N, timed per ARM); log pi_base of every
        evaluated response (KL); the exact fused log-probs of each guided sample (checks the engine's)."""
        from bench.gold.teacher import load_model, teacher_force
        from genarm_common.model_checks import check_fusion_setup

        cfg, vocab = self.cfg, self.vocab
        heldout = [p["ids"] for p in self.prompts()["heldout"]]
        sample, genarm = read_json(self.path("sample.json")), read_json(self.path("genarm.json"))
        arms = read_json(self.path("arms.json"))

        out: dict[str, Any] = {"heldout_pool": {"arm_reward": {}, "arm_score_s_per_sequence": {}},
                               "out_of_vocab_samples": {}}

        def flat(task: dict[str, Any], width: int) -> tuple[list, list]:
            # Plain vLLM can sample the base's padding rows (Qwen's are not zero), which no ARM scores and
            # the fused step never samples: such a response is clipped there, and counted.
            sampled = [s["token_ids"] for per in task["samples"] for s in per]
            responses = [clip_at(ids, width) for ids in sampled]
            out["out_of_vocab_samples"][task["name"]] = sum(len(r) < len(i) for r, i in zip(responses, sampled))
            return [heldout[b] for b, per in enumerate(task["samples"]) for _ in per], responses

        def force(model: Any, others: list[Any], task: dict[str, Any], width: int = vocab, **kw: Any) -> Any:
            return teacher_force(model, others, *flat(task, width), width, batch_size=cfg.teacher_batch, **kw)

        pool = self._task(sample, "heldout_pool")
        for role in ROLES:
            arm = load_model(arms[role]["merged"], self.device, self.hf_dtype)
            started = time.monotonic()
            rewards = [float(x.sum()) for x in force(arm, [], pool).base]
            out["heldout_pool"]["arm_reward"][role] = rewards
            out["heldout_pool"]["arm_score_s_per_sequence"][role] = (time.monotonic() - started) / len(rewards)
            del arm
        base = load_model(self.base_path, self.device, self.hf_dtype)
        for t in cfg.temperatures:
            task = self._task(sample, f"base_T{t:g}")
            tf = force(base, [], task, temperatures=[t] * sum(len(per) for per in task["samples"]))
            out[f"base_T{t:g}"] = {"base": [float(x.sum()) for x in tf.base],
                                   "policy": [float(x.sum()) for x in tf.tempered]}
        for engine, info in genarm["engines"].items():
            names = list(info["arms"])
            models = [load_model(info["arms"][n], self.device, self.hf_dtype) for n in names]
            # Each engine normalises over its own fused vocabulary (its models' rows and the tokenizer),
            # which the weak model's rows need not bound: the exact check uses the same one.
            width = check_fusion_setup(self.base_path, info["arms"]).vocab_size
            for task in (t for t in genarm["tasks"] if t["engine"] == engine):
                count = sum(len(per) for per in task["samples"])
                rows = np.asarray([[task["weights"].get(n, 0.0) for n in names]] * count, dtype=np.float64)
                tf = force(base, models, task, width, weights=rows)
                out[task["name"]] = engine_check(task, tf)
            del models
        write_json(self.path("teacher.json"), out)

    # ------------------------------------------------------------------ CPU side and packing
    def stage_report(self, out: Path) -> None:
        write_report(self, out)

    def pack(self, out: Path) -> None:
        """The gold run's pack, plus the base's tokenizer (the CPU stages need nothing else of the
        models); adapters come back as far as they fit, those over one returned file's size in parts
        (join with cat)."""
        super().pack(out)
        if self.path("tokenizer").is_dir():
            with tarfile.open(out / "gold_tokenizer.tar.gz", "w:gz") as tar:
                tar.add(self.path("tokenizer"), arcname="tokenizer")
        # The 1.5B's ARM alone is ~35 MB: keep adapters, smallest first, while the whole pack stays
        # within what one device call returns; the results never need them (the CPU stages read none).
        used = sum(f.stat().st_size for f in out.iterdir() if not f.name.startswith("gold_arm_"))
        files = sum(1 for f in out.iterdir() if not f.name.startswith("gold_arm_"))
        for tarball in sorted(out.glob("gold_arm_*.tar.gz"), key=lambda f: f.stat().st_size):
            size, pieces = tarball.stat().st_size, -(-tarball.stat().st_size // RETURN_BYTES)
            if used + size > RETURN_TOTAL_BYTES or files + pieces > RETURN_FILES:
                log(f"pack: {tarball.name} ({size / 2**20:.0f} MiB) stays on the machine: over what one call returns")
                tarball.unlink()
                continue
            used, files = used + size, files + pieces
            if size > RETURN_BYTES:
                split_file(tarball, RETURN_BYTES)
                tarball.unlink()


def clip_at(ids: list[int], vocab: int) -> list[int]:
    """The response up to its first id the fused step cannot score (>= vocab)."""
    return next((ids[:i] for i, t in enumerate(ids) if t >= vocab), ids)


def engine_check(task: dict[str, Any], tf: Any) -> dict[str, Any]:
    """KL inputs (base, engine and fp32 policy log-probs per sequence) and the engine's log-prob gap."""
    engine_lp = [np.asarray(s["logprobs"]) for per in task["samples"] for s in per]
    gaps = np.concatenate([np.abs(e - f) for e, f in zip(engine_lp, tf.fused, strict=True)] or [np.zeros(1)])
    return {"base": [float(x.sum()) for x in tf.base], "policy_engine": [float(x.sum()) for x in engine_lp],
            "policy_fp32": [float(x.sum()) for x in tf.fused],
            "engine_vs_fp32_abs_logprob": {"mean": float(gaps.mean()), "p99": float(np.quantile(gaps, 0.99)),
                                           "max": float(gaps.max())}}


# ---------------------------------------------------------------------------- report


def setting_of(task: dict[str, Any]) -> str:
    w = task["weights"]
    if task["engine"] == "proxy":
        a = w["expert"]
        return f"alpha={a:g} (engine check)" if a == 0 else f"alpha={a:g} (expert +{a:g}, anti-expert -{a:g})"
    return f"w={w[task['engine']]:g}" + (" (engine check)" if w[task["engine"]] == 0 else "")


class W2STable(Table):
    """bench/gold's rows (gold, KL, guards, cost) for the weak-to-strong methods."""

    def engine_cost(self, engine: str) -> tuple[str, float]:
        """Forwards per token in words, and the weights used per token relative to the base alone."""
        used = self.genarm["engines"][engine]["weights_per_token"]
        arms = [k for k in used if k != "base"]
        words = "1 + " + " + ".join(f"{k} ({used[k] / 1e6:,.0f}M)" for k in arms)
        return words, sum(used.values()) / used["base"]

    def rows(self) -> list[dict[str, Any]]:
        cfg = self.exp.cfg
        base_tps = self.task(self.sample, "base_T1")["tokens_per_s"]
        rows = []
        for t in cfg.temperatures:
            key, tf = f"base_T{t:g}", self.teacher[f"base_T{t:g}"]
            tps = self.task(self.sample, key)["tokens_per_s"]
            rows.append(self.row("base", f"T={t:g}", key, (tf["policy"], tf["base"]), tps, base_tps / tps, 1,
                                 "sampled tokens, teacher-forced fp32 (exact)"))
            rows[-1]["weights_vs_base"] = 1.0
        for task in self.genarm["tasks"]:
            tf, (words, weights) = self.teacher[task["name"]], self.engine_cost(task["engine"])
            row = self.row(METHODS[task["engine"]], setting_of(task), task["name"], (tf["policy_fp32"], tf["base"]),
                           task["tokens_per_s"], base_tps / task["tokens_per_s"], words,
                           "sampled tokens (engine): fused log-probs teacher-forced in fp32 - base's, fp32")
            engine_kl = np.asarray(tf["policy_engine"]) - np.asarray(tf["base"])
            row.update(kl_engine_logprobs=float(per_prompt(engine_kl, self.prompts).mean()), weights_vs_base=weights,
                       engine=task["engine"], weights=task["weights"])
            rows.append(row)
        return rows + self.best_of_n()

    def best_of_n(self) -> list[dict[str, Any]]:
        """bench/gold's best-of-N once per ARM that picks (the oracle rows once): Table.best_of_n reads
        the picking ARM from teacher["heldout_pool"], so each ARM is put there in turn."""
        teacher, pool = self.teacher, self.teacher["heldout_pool"]
        rows: list[dict[str, Any]] = []
        try:
            for role in ROLES:
                self.teacher = {**teacher, "heldout_pool": {
                    "arm_reward": {self.dim: pool["arm_reward"][role]},
                    "arm_score_s_per_sequence": pool["arm_score_s_per_sequence"][role]}}
                for row in Table.best_of_n(self):
                    if "oracle" in row["method"]:
                        if role == ROLES[0]:
                            rows.append(row)
                    else:
                        rows.append({**row, "method": f"best-of-N ({role} ARM reward)"})
        finally:
            self.teacher = teacher
        return rows

    # ------------------------------------------------------------------ recovery
    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Per prompt: gold and KL (fp32 policy - base) of one guided task."""
        tf = self.teacher[key]
        kl = np.asarray(tf["policy_fp32"]) - np.asarray(tf["base"])
        return per_prompt(self.scores[key][self.dim], self.prompts), per_prompt(kl, self.prompts)

    def recovery(self, seed: int = 0) -> list[dict[str, Any]]:
        """Per weak-ARM and proxy-tuning setting: its gold gain over the base against the strong
        ARM's at the same KL (and at the same weight), with the cost relative to the strong ARM."""
        tasks = [t for t in self.genarm["tasks"] if any(t["weights"].values())]
        strong = {t["weights"]["strong"]: self.curve(t["name"]) for t in tasks if t["engine"] == "strong"}
        strong_tps = float(np.mean([t["tokens_per_s"] for t in tasks if t["engine"] == "strong"]))
        strong_weights = self.engine_cost("strong")[1]
        base = per_prompt(self.scores["base_T1"][self.dim], self.prompts)
        rng = np.random.default_rng(seed)
        draws = [np.arange(self.prompts)] + [rng.integers(0, self.prompts, self.prompts) for _ in range(BOOTSTRAP)]
        rows = []
        for task in (t for t in tasks if t["engine"] != "strong"):
            gold, kl = self.curve(task["name"])
            at_kl = [share_at_kl(base[i], gold[i], kl[i], [(g[i], k[i]) for g, k in strong.values()]) for i in draws]
            row = {"method": METHODS[task["engine"]], "setting": setting_of(task),
                   "gold": float(gold.mean()), "kl": float(kl.mean()), "gain": float(gold.mean() - base.mean()),
                   **summarise("share_at_matched_kl", at_kl),
                   "time_per_token_vs_strong": strong_tps / task["tokens_per_s"],
                   "weights_per_token_vs_strong": self.engine_cost(task["engine"])[1] / strong_weights}
            w = task["weights"].get("weak")
            if w in strong:
                g_strong = strong[w][0]
                row["strong_gain_at_weight"] = float(g_strong.mean() - base.mean())
                row.update(summarise("share_at_matched_weight",
                                     [ratio(gold[i].mean() - base[i].mean(), g_strong[i].mean() - base[i].mean())
                                      for i in draws]))
            rows.append(row)
        return rows


def ratio(num: float, den: float) -> float:
    return num / den if abs(den) > 1e-9 else math.nan


def share_at_kl(base: np.ndarray, gold: np.ndarray, kl: np.ndarray,
                strong: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """(gold - base) / (the strong curve's gold at this KL - base); NaN outside the strong curve's KL range."""
    g0 = float(base.mean())
    xs = np.asarray([0.0] + [float(k.mean()) for _, k in strong])
    ys = np.asarray([g0] + [float(g.mean()) for g, _ in strong])
    order = np.argsort(xs)
    x = float(kl.mean())
    if not xs.min() <= x <= xs.max():
        return math.nan
    return ratio(float(gold.mean()) - g0, float(np.interp(x, xs[order], ys[order])) - g0)


def summarise(name: str, draws: list[float]) -> dict[str, Any]:
    """The estimate (first draw: all prompts) and its bootstrap SE over the rest."""
    rest = np.asarray(draws[1:], dtype=np.float64)
    ok = rest[np.isfinite(rest)]
    return {name: None if math.isnan(draws[0]) else float(draws[0]),
            f"{name}_se": float(ok.std()) if len(ok) > 1 else None,
            f"{name}_defined_share": float(len(ok) / max(1, len(rest)))}


def machine_line(env: dict[str, Any]) -> str:
    """Where the GPU stages ran, and where the commands are."""
    versions = ", ".join(f"{k} {env[k]}" for k in ("vllm", "torch", "transformers", "trl", "peft") if env.get(k))
    gpus = f"{env['gpu_count']} x {env.get('gpu')}" if env.get("gpu_count") else (env.get("gpu") or "no GPU")
    return (f"GPU stages on {gpus} ({env.get('cpu_count')} CPU cores; {versions}); "
            "commands and device calls: bench/gold/README.md, \"Weak-to-strong\".")


def markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [f"# Weak-to-strong on the gold judge: {setup['name']}", "",
             f"Strong base {setup['base']}, weak model {setup['weak']}; gold judge `{setup['dimensions'][0]}`: "
             f"{setup['gold_judge']}.", "", machine_line(setup.get("environment") or {}), "",
             "## ARMs and the DPO expert (held-out pairwise accuracy on gold pairs)", "",
             "| model | role | untrained | trained | train pairs | train s |", "|---|---|---|---|---|---|"]
    for role, a in results["arms"].items():
        lines.append(f"| {Path(a['model']).name} | {role} ARM | {fmt(a['heldout_accuracy_untrained'])} | "
                     f"{fmt(a['heldout_accuracy'])} | {a['train_pairs']} | {fmt(a['train_s'], '.0f')} |")
    for beta, d in (results["dpo"] or {}).items():
        lines.append(f"| {Path(setup['weak']).name} | DPO expert, beta={beta} | - | - | {d['pairs']} | "
                     f"{fmt(d['train_s'], '.0f')} |")
    if results.get("hh_arms"):
        lines += ["", "## HH-RLHF harmless ARMs (the paper's data; genarm-train's LoRA recipe and held-out split)", "",
                  "SmolLM2-135M with the same recipe: 0.567 untrained -> 0.558 trained (bench/train_gpu.py run).", "",
                  "| model | untrained | trained | held-out margin | train pairs | held-out pairs | train s |",
                  "|---|---|---|---|---|---|---|"]
        for a in results["hh_arms"].values():
            lines.append(f"| {Path(a['model']).name} | {fmt(a['heldout_accuracy_untrained'])} | {fmt(a['heldout_accuracy'])} | "
                         f"{fmt(a['heldout_margin'])} | {a['train_pairs']} | {a['heldout_pairs']} | {fmt(a['train_s'], '.0f')} |")
    lines += ["", "## Gold vs KL (held-out prompts, T=1, ± one SE over prompts)", "",
              "| method | setting | gold | KL | relevance | distinct-2 | guard | tokens/s | x base time "
              "| forwards/token |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["methods"]:
        guard = "below the base's range: " + ", ".join(r["guard_below_base"]) if r["guard_below_base"] else "holds"
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['gold'])} ± {fmt(r['gold_se'])} | "
                     f"{fmt(r.get('kl'), '.2f')} | {fmt(r['relevance'])} | {fmt(r['distinct2'])} | {guard} | "
                     f"{fmt(r['tokens_per_s'], '.0f')} | {fmt(r['relative_cost'], '.2f')} | {r['forwards_per_token']} |")
    lines += ["", "## Recovery: the share of the strong ARM's gold gain, and the cost, relative to the strong ARM", "",
              "| method | setting | KL | gold gain | share at matched KL | share at matched weight | "
              "time/token | weights/token |", "|---|---|---|---|---|---|---|---|"]
    for r in results["recovery"]:
        def share(key: str) -> str:
            return f"{fmt(r.get(key))} ± {fmt(r.get(key + '_se'))}" if r.get(key) is not None else "-"

        lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['kl'], '.2f')} | {fmt(r['gain'])} | "
                     f"{share('share_at_matched_kl')} | {share('share_at_matched_weight')} | "
                     f"{fmt(r['time_per_token_vs_strong'], '.2f')}x | "
                     f"{fmt(r['weights_per_token_vs_strong'], '.2f')}x |")
    check = results["engine_check"]
    lines += ["", "Share at matched KL: '-' where the setting's KL lies beyond the strong ARM's curve. "
              "Engine check (zero weights, engine vs fp32 fusion): "
              + ", ".join(f"{k} p99 {fmt(v['p99'], '.4f')}" for k, v in check["zero"].items())
              + f"; largest p99 over all settings {fmt(check['max_p99'], '.4f')}."]
    return "\n".join(lines) + "\n"


def write_report(exp: WeakToStrong, out: Path) -> dict[str, Any]:
    from bench.gold.judges import GOLD_DESCRIPTIONS

    out.mkdir(parents=True, exist_ok=True)
    table = W2STable(exp, exp.dim)
    rows = table.rows()
    plot_frontier(rows, exp.dim, out / "frontier_w2s.png")
    checks = {k: v["engine_vs_fp32_abs_logprob"] for k, v in table.teacher.items() if "engine_vs_fp32_abs_logprob" in v}
    zero = {t["name"]: checks[t["name"]] for t in table.genarm["tasks"] if not any(t["weights"].values())}
    results = {
        "setup": {**exp.cfg.to_dict(), "gold_judge": GOLD_DESCRIPTIONS[exp.dim],
                  "environment": read(exp.work, "environment.json"), "pairs": read(exp.work, "pairs.json"),
                  "engines": {k: {"weights_per_token": v["weights_per_token"], "startup_s": v["startup_s"]}
                              for k, v in table.genarm["engines"].items()},
                  "stage_seconds": read(exp.work, "stages_done.json"),
                  "out_of_vocab_samples": table.teacher["out_of_vocab_samples"]},
        "arms": read(exp.work, "arms.json"),
        "dpo": read(exp.work, "dpo.json"),
        "hh_arms": read(exp.work, "hh_arms.json"),
        "methods": rows,
        "recovery": table.recovery(),
        "engine_check": {"zero": zero, "by_task": checks, "max_p99": max(c["p99"] for c in checks.values())},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    log(f"report: {out / 'results.md'}")
    print(markdown(results).split("## Recovery", 1)[-1], flush=True)
    return results


if __name__ == "__main__":
    sys.exit(run_main(kind=WeakToStrong))
