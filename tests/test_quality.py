"""bench/quality: the quality-experiment harness, end to end on the tiny random models (smoke mode),
plus its metric helpers on their own."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quality.judges import RewardJudge, train_reward_judge
from bench.quality.methods import base_logprobs, select_best_of_n, vader_pairs
from bench.quality.report import Method, win_rate

ROOT = Path(__file__).resolve().parents[1]
MAIN_KEYS = ("base", "genarm_w0", "genarm_w1", "genarm_w4", "best_of_2", "best_of_4", "args", "arm_alone")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality-smoke")
    env = {**os.environ, "GENARM_CACHE": str(out / "cache"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench.quality.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def job(out: Path, name: str) -> dict[str, dict]:
    result = json.loads((out / "work" / "jobs" / f"{name}.result.json").read_text())
    return {t["name"]: t for t in result["tasks"]}


def first_tokens(task: dict) -> list[list[int]]:
    return [per[0]["token_ids"] for per in task["samples"]]


def test_smoke_writes_the_table_and_the_plots(smoke: Path) -> None:
    results = json.loads((smoke / "results.json").read_text())
    for key in MAIN_KEYS:
        for field in ("judge_reward", "win_rate_vs_base", "tokens_per_s", "wall_s", "profanity", "sentiment",
                      "base_logprob_per_token"):
            assert field in results[key], (key, field)
        assert np.isfinite(results[key]["judge_reward"])
    setup = results["setup"]
    assert setup["command"].startswith("python -m bench.quality.run")
    assert setup["models"]["base"]["sha256"] and setup["models"]["arms"]["harmless"]["sha256"]
    assert setup["models"]["arms"]["positive"]["adapter_sha256"]  # trained by genarm-train in the run
    assert setup["judges"]["judge_rm"]["heldout_accuracy"] is not None
    assert setup["data"]["split"]["train_pairs"] > 0 and setup["data"]["split"]["heldout_pairs"] > 0
    points = results["multi_objective"]["points"]
    assert len(points) == 4 and {tuple(p["weights"].values()) for p in points} == {(0, 0), (0, 2), (1, 0), (1, 2)}
    for name in ("results.md", "frontier.png", "tradeoff.png", "samples.jsonl"):
        assert (smoke / name).stat().st_size > 0
    assert "| `best_of_4` |" in (smoke / "results.md").read_text()


def test_judge_never_trains_on_heldout_pairs(smoke: Path) -> None:
    """Re-derived from the data file with the trainer's own split rule, not from counts the run wrote."""
    from rm_training.preference_data import adapt, heldout_score, pku_label_for, read_records, resolve_source

    judge = json.loads((smoke / "work" / "judge_rm.json").read_text())
    setup = json.loads((smoke / "results.json").read_text())["setup"]
    split = setup["data"]["split"]
    records = list(read_records(resolve_source(split["source"]), max_records=setup["config"]["max_records"]))
    label = pku_label_for(split["dimension"], None)

    def held_out(index: int) -> bool:
        _, pair = adapt(records[index], "auto", label)
        key = json.dumps(pair.messages, ensure_ascii=False, sort_keys=True)  # the prompt, as the split hashes it
        return heldout_score(key, split["split_seed"]) < split["heldout_fraction"]

    trained_on, evaluated = judge["train_indices"], setup["prompts"]["record_indices"]
    assert len(trained_on) == judge["train_pairs"] > 0 and evaluated
    assert not [i for i in trained_on if held_out(i)]
    assert all(held_out(i) for i in evaluated)


def test_win_rates_are_those_of_the_per_prompt_rewards(smoke: Path) -> None:
    """Each method's win rate against the base, recomputed prompt by prompt from samples.jsonl
    (rewards there are rounded to 1e-4: a closer pair may go either way)."""
    results = json.loads((smoke / "results.json").read_text())
    rows = [json.loads(line) for line in (smoke / "samples.jsonl").read_text().splitlines()]
    for key in MAIN_KEYS:
        pairs = [(row[key]["judge_rm"], row["base"]["judge_rm"]) for row in rows if key in row and "base" in row]
        wins = sum(1.0 for a, b in pairs if a > b + 1e-4)
        close = sum(1 for a, b in pairs if abs(a - b) <= 1e-4)
        assert pairs and wins / len(pairs) <= results[key]["win_rate_vs_base"] <= (wins + close) / len(pairs), key
    assert results["best_of_4"]["win_rate_vs_base"] >= 0.5  # its pool holds the base's own sample


def test_best_of_n_never_loses_to_its_own_first_sample(smoke: Path) -> None:
    base = job(smoke, "base")
    pool2, pool4 = base["pool_2"]["samples"], base["pool_4"]["samples"]
    # Same seeds: the base run is sample 0 of every pool, and the 2-pool is the 4-pool's first two.
    assert first_tokens(base["base"]) == [per[0]["token_ids"] for per in pool4]
    assert [[s["token_ids"] for s in per] for per in pool2] == [[s["token_ids"] for s in per[:2]] for per in pool4]
    rows = [json.loads(line) for line in (smoke / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["best_of_4"]["judge_rm"] >= row["best_of_2"]["judge_rm"] - 1e-4
        assert row["best_of_2"]["judge_rm"] >= row["base"]["judge_rm"] - 1e-4


def test_genarm_weight_zero_reproduces_the_base(smoke: Path) -> None:
    assert first_tokens(job(smoke, "guided")["genarm_w0"]) == first_tokens(job(smoke, "base")["base"])
    guided = job(smoke, "guided")
    assert first_tokens(guided["genarm_w4"]) != first_tokens(guided["genarm_w0"])  # the ARM does something


def test_reference_decoder_agrees_with_vllm(smoke: Path) -> None:
    """ARGS with top-1 and w=0 is the base's greedy decoding; reference GenARM greedy = engine's."""
    runs = json.loads((smoke / "work" / "args.json").read_text())["runs"]
    n = len(runs["args"]["token_ids"])
    assert runs["base_greedy_reference"]["token_ids"] == first_tokens(job(smoke, "base")["base_greedy"])[:n]
    engine = first_tokens(job(smoke, "guided")["genarm_w1_greedy"])[:n]
    assert runs["genarm_w1_greedy_reference"]["token_ids"] == engine


# ----------------------------------------------------------------------------- helpers on their own


def test_base_logprobs_with_a_shared_prompt_cache_match_a_plain_forward(tiny_family: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family["llama-base"], dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 400, (17,), generator=gen).tolist()
    responses = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (1, 5, 12, 3)] + [[]]
    got = base_logprobs(model, prompt, responses, chunk=3)
    for response, values in zip(responses, got, strict=True):
        if not response:
            assert len(values) == 0
            continue
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        want = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)]
        np.testing.assert_allclose(values, want, atol=1e-4)


def test_select_best_of_n_and_win_rate_ties() -> None:
    scores = np.array([[0.1, 0.5, 0.3, 0.9], [0.2, 0.1, 0.0, 0.05]])
    assert select_best_of_n(scores, 2).tolist() == [1, 0]
    assert select_best_of_n(scores, 4).tolist() == [3, 0]
    with pytest.raises(ValueError):
        select_best_of_n(scores, 5)

    def method(rewards: list[float], idx: list[int]) -> Method:
        m = Method("m", idx, [[1]] * len(idx), [""] * len(idx), [], None, None, "", "")
        m.scores["judge_rm"] = np.array(rewards)
        return m

    base = method([0.0, 1.0, 2.0, 3.0], [0, 1, 2, 3])
    other = method([1.0, 1.0, 0.0], [0, 1, 2])  # win, tie, loss on prompts 0-2
    assert win_rate(other, base)[0] == pytest.approx(0.5)
    assert win_rate(method([5.0], [3]), base)[0] == 1.0


def test_vader_pairs_label_by_sentiment_and_skip_ties() -> None:
    from bench.quality.data import TextPair
    from bench.quality.judges import sentiment

    prompts = [TextPair(i, str(i), [{"role": "user", "content": "hi"}], "", "", [1], "\n\nHuman: hi\n\nAssistant:")
               for i in range(3)]
    samples = [("I love this, wonderful!", "This is terrible and awful."), ("The box.", "The cup."), ("same", "same")]
    records, report = vader_pairs(prompts, samples, sentiment, min_gap=0.1)
    assert len(records) == 1 and records[0]["chosen"].startswith("I love")
    assert report["skipped_ties"] == 1 and report["skipped_identical_or_empty"] == 1
    assert records[0]["prompt"].startswith("\n\nHuman:")


class _StubEmbedder:
    """Fixed random vectors per text: a judge test without loading a sentence model."""

    name = "stub"

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.vectors: dict[str, np.ndarray] = {}

    def weights_sha256(self) -> str:
        return "stub"

    def __call__(self, texts, cache: bool = True, store: bool | None = None) -> np.ndarray:
        for t in texts:
            if t not in self.vectors:
                v = self.rng.normal(size=8).astype(np.float32)
                v[0] = 3.0 if "good" in t else -3.0 if "bad" in t else v[0]
                self.vectors[t] = v
        return np.stack([self.vectors[t] for t in texts])


def test_bradley_terry_judge_learns_a_clear_preference(tmp_path: Path) -> None:
    from bench.quality.data import TextPair

    def pair(i: int) -> TextPair:
        return TextPair(i, str(i), [{"role": "user", "content": f"q{i}"}], f"good answer {i}", f"bad answer {i}", [1])

    embedder = _StubEmbedder()
    judge = train_reward_judge(embedder, [pair(i) for i in range(60)], [pair(i) for i in range(60, 80)],
                               feature_maps=("resp", "resp+inter"), c_grid=(1.0,), folds=3)
    assert judge.meta["heldout_accuracy"] == 1.0 and judge.meta["train_pairs"] == 60
    judge.save(tmp_path / "judge")
    again = RewardJudge.load(tmp_path / "judge", embedder)
    scores = again.score(["q"], ["good one"]) - again.score(["q"], ["bad one"])
    assert scores[0] > 0


def test_hh_data_is_the_bundled_file() -> None:
    path = ROOT / "rm_training" / "data" / "hh-rlhf" / "harmless-pairs-2000.jsonl.gz"
    with gzip.open(path, "rt") as f:
        assert sum(1 for _ in f) == 2000
