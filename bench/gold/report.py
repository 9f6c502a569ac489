"""Gold reward against KL(pi || base), per method, from the stages' cached outputs:
results.json, results.md and the frontier plots.

KL per sequence is estimated as sum_t [log pi(y_t) - log pi_base(y_t)] over the sampled tokens
(log pi: the engine's fused log-probs for GenARM, the exact sampling distribution for DPO, ARGS
and the tempered base; log pi_base: teacher-forced float32), averaged over samples; best-of-N's is
the analytic log N - (N-1)/N. Error bars: one standard error, bootstrap over prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.gold.judges import GOLD_DESCRIPTIONS
from bench.quality.methods import select_best_of_n

BOOTSTRAP = 1000


def read(work: Path, name: str) -> Any:
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None


def per_prompt(values: list[float] | np.ndarray, prompts: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(prompts, -1).mean(axis=1)


def bootstrap_se(values: np.ndarray, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))
    return float(values[idx].mean(axis=1).std())


def summary(values: list[float] | np.ndarray, prompts: int) -> tuple[float, float]:
    per = per_prompt(values, prompts)
    return float(per.mean()), bootstrap_se(per)


class Table:
    """Builds the rows of every method for one reward dimension."""

    def __init__(self, exp: Any, dim: str) -> None:
        self.exp, self.dim = exp, dim
        self.work = exp.work
        self.prompts = len(exp.prompts()["heldout"])
        self.scores = read(self.work, "scores.json")
        self.teacher = read(self.work, "teacher.json")
        self.sample = read(self.work, "sample.json")
        self.genarm = read(self.work, "genarm.json")
        self.hf = read(self.work, "hf.json") or {}
        # A guard "holds" while it stays within what the base itself does at some temperature of the
        # sweep (lower temperatures are more on-topic and more repetitive): the floor is the lowest
        # of the base's means, less two standard errors of the difference.
        self.base_guard = {}
        for g in ("relevance", "distinct2"):
            per_t = [summary(self.scores[f"base_T{t:g}"][g], self.prompts) for t in exp.cfg.temperatures]
            self.base_guard[g] = min(per_t)

    def task(self, source: dict[str, Any], name: str) -> dict[str, Any]:
        return next(t for t in source["tasks"] if t["name"] == name)

    def prompts_for(self, key: str) -> int:
        """ARGS (and its top-k baseline) may run on the first `args_prompts` held-out prompts only."""
        if key.startswith(("args_", "hf_base_top")):
            return min(self.prompts, self.exp.cfg.args_prompts)
        return self.prompts

    def guard(self, key: str, pick: np.ndarray | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {}
        hacked = []
        prompts = self.prompts_for(key)
        for g in ("relevance", "distinct2"):
            values = np.asarray(self.scores[key][g])
            values = values if pick is None else values.reshape(prompts, -1)[np.arange(prompts), pick]
            mean, se = summary(values, prompts)
            base_mean, base_se = self.base_guard[g]
            row[g], row[f"{g}_se"] = mean, se
            if mean < base_mean - 2 * math.hypot(se, base_se):
                hacked.append(g)
        row["guard_below_base"] = hacked
        return row

    def row(self, method: str, setting: str, key: str, kl_pairs: tuple[list[float], list[float]] | None,
            tokens_per_s: float | None, relative_cost: float | None, forwards: float | str,
            kl_estimator: str) -> dict[str, Any]:
        """kl_pairs: (log pi, log pi_base) summed per sequence, in sample order."""
        prompts = self.prompts_for(key)
        gold, gold_se = summary(self.scores[key][self.dim], prompts)
        out = {"method": method, "setting": setting, "gold": gold, "gold_se": gold_se}
        if kl_pairs is not None:
            kl = np.asarray(kl_pairs[0]) - np.asarray(kl_pairs[1])
            out["kl"], out["kl_se"] = summary(kl, prompts)
        out["kl_estimator"] = kl_estimator
        out.update(self.guard(key))
        out.update(tokens_per_s=tokens_per_s, relative_cost=relative_cost, forwards_per_token=forwards,
                   mean_tokens=float(np.mean(self.scores[key]["tokens"])))
        return out

    def rows(self) -> list[dict[str, Any]]:
        cfg = self.exp.cfg
        rows = []
        base_tps = self.task(self.sample, "base_T1")["tokens_per_s"]
        for t in cfg.temperatures:
            key = f"base_T{t:g}"
            tf = self.teacher[key]
            tps = self.task(self.sample, key)["tokens_per_s"]
            rows.append(self.row("base", f"T={t:g}", key, (tf["policy"], tf["base"]), tps, base_tps / tps, 1,
                                 "sampled tokens, teacher-forced fp32 (exact)"))
        loaded = len(cfg.dimensions)
        for key, setting in [("genarm_zero", "w=0 (engine check)"),
                             *[(f"genarm_{self.dim}_w{w:g}", f"w={w:g}") for w in cfg.genarm_weights]]:
            tf = self.teacher[key]
            tps = self.task(self.genarm, key)["tokens_per_s"]
            row = self.row("GenARM", setting, key, (tf["policy_fp32"], tf["base"]), tps, base_tps / tps, 1 + loaded,
                           "sampled tokens (engine, bf16): fused log-probs teacher-forced in fp32 - base's, fp32")
            engine_kl = np.asarray(tf["policy_engine"]) - np.asarray(tf["base"])
            row["kl_engine_logprobs"] = summary(engine_kl, self.prompts)[0]
            rows.append(row)
        rows += self.best_of_n()
        def hf_order(key: str) -> tuple[int, float]:
            if key.startswith("dpo_beta"):
                return (0, float(key.removeprefix("dpo_beta")))
            if key.startswith("args_"):
                return (2, float(key.rsplit("_w", 1)[-1]))
            return (1, 0.0)  # the base through the same loop (top-k alone: ARGS at w=0)

        for key, item in sorted(self.hf.items(), key=lambda kv: hf_order(kv[0])):
            ref = self.hf["hf_base"]["tokens_per_s"]
            if key.startswith("dpo_beta") and self.dim == cfg.dimensions[0]:
                method, setting = "DPO", f"beta={key.removeprefix('dpo_beta')}"
            elif key.startswith(f"args_{self.dim}_w"):
                method, setting = "ARGS", f"w={key.removeprefix(f'args_{self.dim}_w')}, top-{cfg.args_top_k}"
            elif key.startswith("hf_base_top") and self.dim == cfg.dimensions[0]:
                method, setting = "ARGS", f"w=0, top-{cfg.args_top_k} (truncation alone)"
            else:
                continue
            tf = self.teacher[key]
            rows.append(self.row(method, setting, key, (tf["policy"], tf["base"]), item["tokens_per_s"],
                                 ref / item["tokens_per_s"], 1,
                                 "sampled tokens: exact policy log-probs - teacher-forced base (fp32)"))
            if method == "ARGS":
                rows[-1]["note"] = "prompts: first %d held-out" % cfg.args_prompts
        return rows

    def best_of_n(self) -> list[dict[str, Any]]:
        cfg = self.exp.cfg
        pool = self.task(self.sample, "heldout_pool")
        gen_tps = pool["tokens_per_s"]
        tokens = np.asarray(self.scores["heldout_pool"]["tokens"], dtype=np.float64).reshape(self.prompts, -1)
        gold = np.asarray(self.scores["heldout_pool"][self.dim]).reshape(self.prompts, -1)
        arm = np.asarray(self.teacher["heldout_pool"]["arm_reward"][self.dim]).reshape(self.prompts, -1)
        score_s = self.teacher["heldout_pool"]["arm_score_s_per_sequence"]
        base_tps = self.task(self.sample, "base_T1")["tokens_per_s"]
        rows = []
        for picker, scores in (("best-of-N (ARM reward)", arm), ("best-of-N (gold, oracle)", gold)):
            for n in cfg.best_of:
                pick = select_best_of_n(scores, n)
                chosen = gold[np.arange(self.prompts), pick]
                mean, se = float(chosen.mean()), bootstrap_se(chosen)
                delivered = tokens[np.arange(self.prompts), pick]
                seconds = n * (tokens[:, :n].mean() / gen_tps + (score_s if picker.startswith("best-of-N (ARM") else 0))
                tps = float(delivered.mean() / seconds)
                row = {"method": picker, "setting": f"N={n}", "gold": mean, "gold_se": se,
                       "kl": math.log(n) - (n - 1) / n, "kl_se": 0.0, "kl_estimator": "analytic log N - (N-1)/N",
                       "tokens_per_s": tps, "relative_cost": base_tps / tps,
                       "forwards_per_token": f"{n} + {n} ARM scoring passes" if "ARM" in picker else f"{n} + gold judge",
                       "mean_tokens": float(delivered.mean())}
                row.update(self.guard("heldout_pool", pick))
                rows.append(row)
        return rows


def recommended_range(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GenARM weights whose guards hold, and the best gold among them."""
    genarm = [r for r in rows if r["method"] == "GenARM" and "check" not in r["setting"]]
    ok = [r for r in genarm if not r["guard_below_base"]]
    if not ok:
        return {"weights": [], "note": "every weight trips a guard"}
    best = max(ok, key=lambda r: r["gold"])
    return {"weights": [float(r["setting"][2:]) for r in ok], "best_guarded": best["setting"], "gold": best["gold"]}


def grid_rows(exp: Any) -> list[dict[str, Any]]:
    genarm = read(exp.work, "genarm.json")
    scores = read(exp.work, "scores.json")["grid"]
    dims = exp.cfg.dimensions
    prompts = len(exp.prompts()["heldout"])
    rows = []
    for g, (a, b) in enumerate(genarm["grid"]):
        part = slice(g * prompts, (g + 1) * prompts)
        row = {"weights": {dims[0]: a, dims[1]: b}}
        for key in (*dims, "relevance", "distinct2"):
            values = np.asarray(scores[key][part])
            row[key], row[f"{key}_se"] = float(values.mean()), bootstrap_se(values)
        rows.append(row)
    return rows


def plot_frontier(rows: list[dict[str, Any]], dim: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        pts = [r for r in rows if r["method"] == method and "kl" in r]
        pts.sort(key=lambda r: r["kl"])
        xs, ys = [r["kl"] for r in pts], [r["gold"] for r in pts]
        line = ax.errorbar(xs, ys, xerr=[r.get("kl_se", 0) for r in pts], yerr=[r["gold_se"] for r in pts],
                           marker="o", capsize=2, label=method, linestyle="--" if "oracle" in method else "-")
        for r in pts:
            if r["guard_below_base"]:
                ax.scatter([r["kl"]], [r["gold"]], s=160, facecolors="none", edgecolors="red", zorder=5)
            ax.annotate(r["setting"].split(",")[0], (r["kl"], r["gold"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=line[0].get_color())
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(pi || base), nats per response")
    ax.set_ylabel(f"gold reward: {dim}")
    ax.set_title(f"{dim}: gold vs KL (red ring: a guard fell below the base's range)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_grid(rows: list[dict[str, Any]], dims: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    xs, ys = [r[dims[0]] for r in rows], [r[dims[1]] for r in rows]
    hacked = [r["relevance"] < rows[0]["relevance"] - 2 * r["relevance_se"] for r in rows]
    ax.errorbar(xs, ys, xerr=[r[f"{dims[0]}_se"] for r in rows], yerr=[r[f"{dims[1]}_se"] for r in rows],
                fmt="o", capsize=2)
    for r, x, y, bad in zip(rows, xs, ys, hacked, strict=True):
        w = r["weights"]
        ax.annotate(f"({w[dims[0]]:g}, {w[dims[1]]:g})", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points",
                    color="red" if bad else "black")
    ax.set_xlabel(f"gold {dims[0]}")
    ax.set_ylabel(f"gold {dims[1]}")
    ax.set_title(f"Both ARMs in one engine: weights ({dims[0]}, {dims[1]}) per request")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Gold-judge experiment: {results['setup']['name']}", ""]
    arms = results["arms"]
    lines += ["## ARMs (held-out accuracy on gold pairs of held-out prompts)", "",
              "| ARM | recipe | train pairs | held-out pairs | untrained | trained | train s |", "|---|---|---|---|---|---|---|"]
    for key, a in arms.items():
        lines.append(f"| {key} | {a['recipe']} | {a['train_pairs']} | {a['heldout_pairs']} | "
                     f"{fmt(a['heldout_accuracy_untrained'])} | {fmt(a['heldout_accuracy'])} | {fmt(a['train_s'], '.0f')} |")
    for dim, rows in results["methods"].items():
        lines += ["", f"## {dim}: gold vs KL", "",
                  "| method | setting | gold | KL | relevance | distinct-2 | guard | tokens/s | x base cost | forwards/token |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            guard = "below the base's range: " + ", ".join(r["guard_below_base"]) if r["guard_below_base"] else "holds"
            lines.append(f"| {r['method']} | {r['setting']} | {fmt(r['gold'])} ± {fmt(r['gold_se'])} | "
                         f"{fmt(r.get('kl'), '.2f')} | {fmt(r['relevance'])} | {fmt(r['distinct2'])} | {guard} | "
                         f"{fmt(r['tokens_per_s'], '.0f')} | {fmt(r['relative_cost'], '.2f')} | {r['forwards_per_token']} |")
        lines += ["", f"Recommended GenARM weights for {dim}: {results['recommended'][dim]}"]
    lines += ["", "## Both ARMs, weights per request in one batch", "",
              "| weights | " + " | ".join(results["setup"]["dimensions"]) + " | relevance | distinct-2 |",
              "|---|" + "---|" * (len(results["setup"]["dimensions"]) + 2)]
    for r in results["grid"]:
        dims = results["setup"]["dimensions"]
        lines.append(f"| {r['weights']} | " + " | ".join(f"{fmt(r[d])} ± {fmt(r[d + '_se'])}" for d in dims)
                     + f" | {fmt(r['relevance'])} | {fmt(r['distinct2'])} |")
    check = results["engine_check"]
    lines += ["", "## Engine check", "",
              f"GenARM w=0 in the guided engine vs the fp32 reference: mean |log-prob gap| {fmt(check['zero']['mean'], '.4f')}, "
              f"p99 {fmt(check['zero']['p99'], '.4f')}; largest over all weights: {fmt(check['max_p99'], '.4f')} (p99)."]
    return "\n".join(lines) + "\n"


def write_report(exp: Any, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = exp.cfg
    methods, recommended = {}, {}
    for dim in cfg.dimensions:
        rows = Table(exp, dim).rows()
        methods[dim] = rows
        recommended[dim] = recommended_range(rows)
        plot_frontier(rows, dim, out / f"frontier_{dim}.png")
    grid = grid_rows(exp)
    plot_grid(grid, cfg.dimensions, out / "frontier_2d.png")
    teacher = read(exp.work, "teacher.json")
    checks = {k: v["engine_vs_fp32_abs_logprob"] for k, v in teacher.items() if "engine_vs_fp32_abs_logprob" in v}
    results = {
        "setup": {**cfg.to_dict(), "gold_judges": {d: GOLD_DESCRIPTIONS[d] for d in cfg.dimensions},
                  "environment": read(exp.work, "environment.json"),
                  "pairs": read(exp.work, "pairs.json"), "stage_seconds": read(exp.work, "stages_done.json")},
        "arms": read(exp.work, "arms.json"),
        "bow_reward": read(exp.work, "bow.json"),
        "dpo": read(exp.work, "dpo.json"),
        "methods": methods,
        "recommended": recommended,
        "grid": grid,
        "engine_check": {"zero": checks.get("genarm_zero"), "by_task": checks,
                         "max_p99": max(c["p99"] for c in checks.values())},
        "base_tokens_per_s": next(t for t in read(exp.work, "sample.json")["tasks"] if t["name"] == "base_T1")["tokens_per_s"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results
