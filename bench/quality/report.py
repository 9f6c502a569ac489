"""Score every method's outputs with the judges, and write results.json, results.md and the plots."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality.progress import log, wkey

MAIN_ORDER = ("base", "base_greedy", "base_t", "genarm", "best_of", "args", "arm_alone")


@dataclass
class Method:
    name: str
    idx: list[int]  # evaluation-prompt indices (0 .. n-1) this method answered
    token_ids: list[list[int]]
    texts: list[str]
    finish: list[str]
    wall_s: float | None
    generated_tokens: int | None
    engine: str
    decoding: str
    table: str = "main"  # main | reference | multi
    weights: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    pool: list[list[str]] | None = None  # best-of-N: every sample's text, per prompt


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _first(samples: list[list[dict]]) -> tuple[list[list[int]], list[str], list[str]]:
    return ([s[0]["token_ids"] for s in samples], [s[0]["text"] for s in samples],
            [s[0]["finish_reason"] for s in samples])


def collect_methods(exp: Any) -> dict[str, Method]:
    from bench.quality.methods import select_best_of_n

    cfg = exp.cfg
    prompts = exp.eval_prompts()
    users = [p.last_user for p in prompts]
    jobs = exp.work / "jobs"
    sampled = f"sampled T={cfg.temperature:g}"
    methods: dict[str, Method] = {}

    def add_task(task: dict, engine: str, name: str | None = None, **kw: Any) -> Method:
        ids, texts, finish = _first(task["samples"])
        m = Method(name or task["name"], list(range(len(ids))), ids, texts, finish, task["wall_s"],
                   task["generated_tokens"], engine, **kw)
        methods[m.name] = m
        return m

    base_job = _load(jobs / "base.result.json")
    if base_job:
        tasks = {t["name"]: t for t in base_job["tasks"]}
        add_task(tasks["base"], "vLLM (plain)", decoding=sampled)
        if "base_greedy" in tasks:
            add_task(tasks["base_greedy"], "vLLM (plain)", decoding="greedy")
        for name, task in tasks.items():
            if name.startswith("base_t"):
                add_task(task, "vLLM (plain)", decoding=f"sampled T={name.removeprefix('base_t')} (control)")
        timing_file = exp.work / "best_of_scoring.json"
        timing = _load(timing_file) or {}
        for size in cfg.best_of:
            pool = tasks.get(f"pool_{size}")
            if pool is None:
                continue
            flat_users = [users[b] for b, per in enumerate(pool["samples"]) for _ in per]
            flat_texts = [s["text"] for per in pool["samples"] for s in per]
            t0 = time.monotonic()
            # Not from the embedding cache: the judge's scoring time is part of best-of-N's cost.
            scores = exp.judge().score(flat_users, flat_texts, cache=False, store=True)
            if str(size) not in timing:
                timing[str(size)] = time.monotonic() - t0
                timing_file.write_text(json.dumps(timing))
            scores = scores.reshape(len(pool["samples"]), size)
            pick = select_best_of_n(scores, size)
            chosen = [pool["samples"][b][int(k)] for b, k in enumerate(pick)]
            m = Method(f"best_of_{size}", list(range(len(chosen))), [c["token_ids"] for c in chosen],
                       [c["text"] for c in chosen], [c["finish_reason"] for c in chosen],
                       pool["wall_s"] + timing[str(size)], pool["generated_tokens"], "vLLM (plain) + judge RM",
                       decoding=f"{size} samples ({sampled}), best by the judge RM")
            m.extra = {"generation_s": pool["wall_s"], "judge_scoring_s": timing[str(size)],
                       "pool_mean_judge_reward": float(scores.mean()), "picked_sample": pick.tolist()}
            m.pool = [[s["text"] for s in per] for per in pool["samples"]]
            methods[m.name] = m
    guided = _load(jobs / "guided.result.json")
    if guided:
        for task in guided["tasks"]:
            greedy = task["name"].endswith("_greedy")
            w = float(task["name"].removeprefix("genarm_w").removesuffix("_greedy"))
            add_task(task, "vLLM (guided, base + harmless ARM)", decoding="greedy" if greedy else sampled,
                     weights={cfg.split_from: w})
    arm = _load(jobs / "arm_alone.result.json")
    if arm:
        add_task(arm["tasks"][0], "vLLM (plain, the merged ARM)", decoding=sampled)
    args = _load(exp.work / "args.json")
    if args:
        for name, run in args["runs"].items():
            k = len(run["token_ids"])
            if name.startswith("args"):
                label = f"greedy ARGS, top-{args['settings']['top_k']}, w={run.get('weight', args['settings']['weight']):g}"
                table = "main"
            else:
                label = "greedy"
                table = "reference"
            m = Method(name, list(range(k)), run["token_ids"], run["texts"], run.get("finish_reasons") or [],
                       run["wall_s"], sum(len(t) for t in run["token_ids"]),
                       "transformers reference decoder (fp32)" + (" + judge RM" if name.startswith("args") else ""),
                       decoding=label, table=table)
            if name.startswith("args"):
                m.extra = {"lm_s": run["lm_s"], "judge_s": run["judge_s"], "judge_calls": run["judge_calls"]}
            methods[name] = m
    multi = _load(jobs / "multi.result.json")
    if multi and cfg.multi:
        (d1, g1), (d2, g2) = list(cfg.multi.grid.items())
        names = [f"multi_{d1}{wkey(a)}_{d2}{wkey(b)}" for a in g1 for b in g2]
        grid = [(a, b) for a in g1 for b in g2]
        for task, name, (a, b) in zip(multi["tasks"], names, grid, strict=True):
            add_task(task, "vLLM (guided, base + harmless + positive ARMs)", name=name, decoding=sampled,
                     table="multi", weights={d1: a, d2: b})
    return methods


def _token_hash(token_ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()[:16]


def score_methods(exp: Any, methods: dict[str, Method]) -> None:
    """judge RM, profanity, VADER, length and base log-prob (drift) of every output."""
    from bench.quality.judges import profanity, sentiment

    prompts = exp.eval_prompts()
    users = [p.last_user for p in prompts]
    judge = exp.judge()
    for m in methods.values():
        u = [users[i] for i in m.idx]
        m.scores["judge_rm"] = judge.score(u, m.texts)
        m.scores["profanity"] = profanity(m.texts)
        m.scores["sentiment"] = sentiment(m.texts)
        m.scores["length"] = np.array([len(t) for t in m.token_ids], dtype=np.float64)
    exp.save_embeddings()
    drift_file = exp.work / "drift.json"
    drift = _load(drift_file) or {}
    todo = [m for m in methods.values() if drift.get(m.name, {}).get("hash") != _token_hash(m.token_ids)]
    if todo:
        import torch

        from bench.quality.methods import base_logprobs, load_causal_lm

        model, _ = load_causal_lm(str(exp.base_path()), getattr(torch, exp.cfg.reference_dtype))
        started = time.monotonic()
        per_method: dict[str, list[float]] = {m.name: [float("nan")] * len(m.idx) for m in todo}
        for b, prompt in enumerate(prompts):
            owners = [(m, j) for m in todo for j, i in enumerate(m.idx) if i == b]
            if not owners:
                continue
            values = base_logprobs(model, prompt.prompt_ids, [m.token_ids[j] for m, j in owners])
            for (m, j), v in zip(owners, values, strict=True):
                per_method[m.name][j] = float(np.mean(v)) if len(v) else float("nan")
        for m in todo:
            drift[m.name] = {"hash": _token_hash(m.token_ids), "values": per_method[m.name]}
        drift_file.write_text(json.dumps(drift))
        log(f"drift: {len(todo)} method(s) teacher-forced through the base in {time.monotonic() - started:.0f} s")
    for m in methods.values():
        m.scores["base_logprob"] = np.array(drift[m.name]["values"], dtype=np.float64)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def win_rate(m: Method, ref: Method) -> tuple[float, float, int]:
    """Share of prompts where m's judge reward beats ref's on the same prompt (ties count half)."""
    pos = {i: k for k, i in enumerate(ref.idx)}
    pairs = [(m.scores["judge_rm"][j], ref.scores["judge_rm"][pos[i]]) for j, i in enumerate(m.idx) if i in pos]
    if not pairs:
        return float("nan"), float("nan"), 0
    wins = np.array([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    return float(wins.mean()), float(wins.std(ddof=1) / np.sqrt(len(wins))) if len(wins) > 1 else 0.0, len(wins)


def summarize(m: Method, methods: dict[str, Method]) -> dict[str, Any]:
    r, r_se = _mean_se(m.scores["judge_rm"])
    out: dict[str, Any] = {"judge_reward": r, "judge_reward_se": r_se}
    if "base" in methods:
        wr, wr_se, k = win_rate(m, methods["base"])
        out.update(win_rate_vs_base=wr, win_rate_vs_base_se=wr_se)
        base_same = np.array([methods["base"].scores["judge_rm"][i] for i in m.idx])
        out["base_judge_reward_same_prompts"] = float(base_same.mean())
    if m.decoding.startswith("greedy") and "base_greedy" in methods and m.name != "base_greedy":
        out["win_rate_vs_base_greedy"] = win_rate(m, methods["base_greedy"])[0]
    out_tokens = int(m.scores["length"].sum())
    out.update(
        profanity=_mean_se(m.scores["profanity"])[0],
        sentiment=_mean_se(m.scores["sentiment"])[0],
        sentiment_se=_mean_se(m.scores["sentiment"])[1],
        base_logprob_per_token=_mean_se(m.scores["base_logprob"])[0],
        base_logprob_per_token_se=_mean_se(m.scores["base_logprob"])[1],
        mean_length_tokens=float(m.scores["length"].mean()),
        finished_by_eos=float(np.mean([f == "stop" for f in m.finish])) if m.finish else None,
        n_prompts=len(m.idx),
        wall_s=m.wall_s,
        tokens_per_s=out_tokens / m.wall_s if m.wall_s else None,
        generated_tokens=m.generated_tokens,
        generated_tokens_per_s=m.generated_tokens / m.wall_s if m.wall_s and m.generated_tokens else None,
        engine=m.engine,
        decoding=m.decoding,
    )
    if m.weights:
        out["weights"] = m.weights
    out.update(m.extra)
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return format(x, spec)


def _order(names: list[str]) -> list[str]:
    def key(name: str) -> tuple:
        for rank, prefix in enumerate(MAIN_ORDER):
            if name == prefix or (prefix != "base" and name.startswith(prefix + "_")) or (
                    prefix in ("genarm", "base_t") and name.startswith(prefix)):
                greedy = name.endswith("_greedy")
                try:
                    num = float(name.split("_w")[-1].removesuffix("_greedy")) if name.startswith("genarm") else (
                        float(name.split("_")[-1]) if prefix == "best_of" else 0.0)
                except ValueError:
                    num = 0.0
                return (rank, greedy, num)
        return (len(MAIN_ORDER), False, 0.0)

    return sorted(names, key=key)


def markdown(results: dict[str, Any], setup: dict[str, Any]) -> str:
    rows = [k for k in _order([k for k, v in results.items() if isinstance(v, dict) and v.get("table") == "main"])]
    judge = setup["judges"]["judge_rm"]
    lines = [
        f"# Quality experiment: {setup['config']['name']}",
        "",
        f"Command: `{setup['command']}`  ",
        f"Base: `{Path(setup['models']['base']['path']).name}`; ARMs: "
        + ", ".join(f"`{k}`" for k in setup["models"]["arms"]) + f"; {setup['prompts']['n']} held-out prompts, "
        f"{setup['generation']['max_new_tokens']} new tokens, T={setup['generation']['temperature']} (sampled rows).  ",
        f"Judge RM: {judge['what']}, feature `{judge['feature']}`, held-out pairwise accuracy "
        f"{_fmt(judge['heldout_accuracy'])} on {judge['heldout_pairs']} held-out pairs (train {judge['train_pairs']}).",
        "",
        "| method | decoding | n | judge RM reward (judge RM) | win rate vs base (judge RM) | P(offensive) (profanity-check) "
        "| VADER | base log-prob/token (drift) | length | tokens/s | wall s | engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in rows:
        r = results[name]
        lines.append(
            f"| `{name}` | {r['decoding']} | {r['n_prompts']} | {_fmt(r['judge_reward'])} ± {_fmt(r['judge_reward_se'])} "
            f"| {_fmt(r.get('win_rate_vs_base'), '.2f')} ± {_fmt(r.get('win_rate_vs_base_se'), '.2f')} "
            f"| {_fmt(r['profanity'])} | {_fmt(r['sentiment'])} | {_fmt(r['base_logprob_per_token'], '.2f')} "
            f"| {_fmt(r['mean_length_tokens'], '.1f')} | {_fmt(r['tokens_per_s'], '.1f')} | {_fmt(r['wall_s'], '.1f')} "
            f"| {r['engine']} |")
    ref_rows = [k for k, v in results.items() if isinstance(v, dict) and v.get("table") == "reference"]
    if ref_rows or "args" in results:
        lines += ["", "Same prompts on the transformers reference decoder (fp32, batch "
                  f"{setup['config']['args']['batch_size']}), for a like-for-like cost comparison with ARGS:", "",
                  "| method | n | judge RM reward | win rate vs base greedy | base log-prob/token | tokens/s | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for name in [*ref_rows, *_order([k for k in results if k.startswith("args")])]:
            r = results[name]
            lines.append(f"| `{name}` | {r['n_prompts']} | {_fmt(r['judge_reward'])} ± {_fmt(r['judge_reward_se'])} "
                         f"| {_fmt(r.get('win_rate_vs_base_greedy'), '.2f')} | {_fmt(r['base_logprob_per_token'], '.2f')} "
                         f"| {_fmt(r['tokens_per_s'], '.1f')} | {_fmt(r['wall_s'], '.1f')} |")
    multi = results.get("multi_objective")
    if multi:
        lines += ["", f"Multi-objective grid ({multi['n_prompts']} prompts, {multi['engine']}):", "",
                  "| weights | judge RM reward | VADER | P(offensive) | base log-prob/token | win rate vs base |",
                  "|---|---|---|---|---|---|"]
        for point in multi["points"]:
            w = ", ".join(f"{k}={v:g}" for k, v in point["weights"].items())
            lines.append(f"| {w} | {_fmt(point['judge_reward'])} ± {_fmt(point['judge_reward_se'])} "
                         f"| {_fmt(point['sentiment'])} ± {_fmt(point['sentiment_se'])} | {_fmt(point['profanity'])} "
                         f"| {_fmt(point['base_logprob_per_token'], '.2f')} | {_fmt(point.get('win_rate_vs_base'), '.2f')} |")
    cj = results.get("cross_judge")
    if cj:
        lines += ["", "Robustness (best-of-N and ARGS optimise the judge that scores them): judge B, fitted on half "
                  f"of the train split (held-out accuracy {_fmt(cj['judge_b']['heldout_accuracy'])}), scores every "
                  "method; best-of-N re-picked by judge A, fitted on the other half "
                  f"(held-out accuracy {_fmt(cj['judge_a']['heldout_accuracy'])}):", "",
                  "| method | n | judge B reward | win rate vs base (judge B) |", "|---|---|---|---|"]
        for name, r in cj["rows"].items():
            lines.append(f"| `{name}` | {r['n_prompts']} | {_fmt(r['judge_b_reward'])} "
                         f"| {_fmt(r.get('win_rate_vs_base_judge_b'), '.2f')} |")
    lines += ["", "± is one standard error over prompts. tokens/s = response tokens delivered per second of wall "
              "time for the whole batch (best-of-N: the N samples' generation plus judge scoring); vLLM rows and "
              "reference-decoder rows are different engines: compare cost within one table.", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    multi = results.get("multi_objective")
    if multi:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        pts = multi["points"]
        dims = list(pts[0]["weights"])
        xs = [p["sentiment"] for p in pts]
        ys = [p["judge_reward"] for p in pts]
        colors = [p["weights"][dims[1]] for p in pts]
        sc = ax.scatter(xs, ys, c=colors, s=[40 + 40 * p["weights"][dims[0]] for p in pts], cmap="viridis",
                        edgecolors="k", zorder=3)
        for p, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate("(" + ",".join(f"{p['weights'][d]:g}" for d in dims) + ")", (x, y), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        for p, x, y in zip(pts, xs, ys, strict=True):
            ax.errorbar(x, y, xerr=p["sentiment_se"], yerr=p["judge_reward_se"], fmt="none", ecolor="0.7", zorder=1)
        front = sorted(zip(xs, ys, strict=True), key=lambda t: -t[0])
        pareto, best = [], -np.inf
        for x, y in front:
            if y > best:
                pareto.append((x, y))
                best = y
        ax.plot([p[0] for p in pareto], [p[1] for p in pareto], "r--", lw=1, label="Pareto front", zorder=2)
        fig.colorbar(sc, ax=ax, label=f"weight {dims[1]}")
        ax.set_xlabel("VADER compound sentiment (judge: vaderSentiment)")
        ax.set_ylabel("judge RM reward (held-out harmlessness judge)")
        ax.set_title(f"GenARM weights ({dims[0]}, {dims[1]}); marker size = {dims[0]} weight", fontsize=10)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "frontier.png", dpi=130)
        plt.close(fig)
        written.append("frontier.png")
    main = [k for k, v in results.items() if isinstance(v, dict) and v.get("table") in ("main",)]
    if main:
        fig, ax = plt.subplots(figsize=(6.8, 4.8))
        for name in _order(main):
            r = results[name]
            marker = "o" if name.startswith("genarm") else "s" if name.startswith("best_of") else "^"
            ax.errorbar(r["base_logprob_per_token"], r["judge_reward"], xerr=r["base_logprob_per_token_se"],
                        yerr=r["judge_reward_se"], fmt=marker, capsize=2)
            ax.annotate(name, (r["base_logprob_per_token"], r["judge_reward"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xlabel("mean base log-prob per token (higher = closer to the base)")
        ax.set_ylabel("judge RM reward")
        ax.set_title("Reward vs drift from the base", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "tradeoff.png", dpi=130)
        plt.close(fig)
        written.append("tradeoff.png")
    return written


def cross_judge(exp: Any, methods: dict[str, Method]) -> dict[str, Any]:
    """Robustness: best-of-N and ARGS optimise the judge they are scored by. Two judges fitted on
    disjoint halves of the train split: best-of-N picks with judge A, every method is scored by B."""
    from bench.quality.judges import split_half_judges
    from bench.quality.methods import select_best_of_n

    train = exp.split.train
    if exp.cfg.judge.max_train_pairs:
        train = train[: exp.cfg.judge.max_train_pairs]
    judge_a, judge_b = split_half_judges(exp.judge(), train, exp.split.heldout)
    users = [p.last_user for p in exp.eval_prompts()]
    rows: dict[str, Any] = {}
    base = methods.get("base")
    base_b = judge_b.score([users[i] for i in base.idx], base.texts) if base else None

    def row(name: str, idx: list[int], rewards: np.ndarray) -> None:
        entry: dict[str, Any] = {"judge_b_reward": float(rewards.mean()), "n_prompts": len(idx)}
        if base_b is not None:
            ref = np.array([base_b[i] for i in idx])
            entry["win_rate_vs_base_judge_b"] = float(np.mean((rewards > ref) + 0.5 * (rewards == ref)))
            entry["base_judge_b_reward_same_prompts"] = float(ref.mean())
        rows[name] = entry

    for name, m in methods.items():
        if m.table != "main":
            continue
        if m.pool is not None:
            flat_u = [users[b] for b, per in enumerate(m.pool) for _ in per]
            flat_t = [t for per in m.pool for t in per]
            size = len(m.pool[0])
            pick = select_best_of_n(judge_a.score(flat_u, flat_t).reshape(len(m.pool), size), size)
            texts = [m.pool[b][int(k)] for b, k in enumerate(pick)]
            row(f"{name} (picked by judge A)", m.idx, judge_b.score([users[i] for i in m.idx], texts))
        row(name, m.idx, judge_b.score([users[i] for i in m.idx], m.texts))
    exp.save_embeddings()
    return {"judge_a": judge_a.meta, "judge_b": judge_b.meta, "rows": rows,
            "what": "judge A and judge B: the judge RM's feature map and C, refitted on two disjoint random halves "
                    "of the train split; 'picked by judge A' rows select best-of-N with A, every row is scored by B"}


def build_report(exp: Any) -> dict[str, Any]:
    methods = collect_methods(exp)
    if not methods:
        raise RuntimeError("nothing to report: run the generate stage first")
    score_methods(exp, methods)
    results: dict[str, Any] = {}
    for name, m in methods.items():
        if m.table == "multi":
            continue
        results[name] = summarize(m, methods) | {"table": m.table}
    multi = [m for m in methods.values() if m.table == "multi"]
    if multi:
        results["multi_objective"] = {
            "n_prompts": len(multi[0].idx), "engine": multi[0].engine,
            "points": [{"name": m.name, "weights": m.weights} | summarize(m, methods) for m in multi],
        }
    results["cross_judge"] = cross_judge(exp, methods)
    w2s = exp.work / "weak_to_strong.json"
    results["weak_to_strong"] = _load(w2s) or {"status": "not run"}
    setup = exp.setup_record()
    results["setup"] = setup
    out = exp.out
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "results.md").write_text(markdown(results, setup))
    written = plots(results, out)
    prompts = exp.eval_prompts()
    with open(out / "samples.jsonl", "w") as f:
        for b, p in enumerate(prompts):
            row = {"prompt_index": b, "record_index": p.index, "last_user_turn": p.last_user}
            for name, m in methods.items():
                if b in m.idx:
                    j = m.idx.index(b)
                    row[name] = {"text": m.texts[j], "judge_rm": round(float(m.scores["judge_rm"][j]), 4)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log(f"report: {out / 'results.json'}, {out / 'results.md'}, {', '.join(written)}, samples.jsonl")
    return results
