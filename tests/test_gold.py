"""The gold-judge experiment (bench/gold) end to end on the tiny random family: every stage, the
command the README gives, and the invariants its numbers must keep whatever the models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.server_process import ROOT


def run(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gold.run", "--smoke", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """As on the GPU machine: the GPU stages, packed; then, from the unpacked tarball in a fresh work
    folder, the CPU stages (gold scores, guards, report)."""
    root = tmp_path_factory.mktemp("gold")
    packed, out = root / "packed", root / "out"
    run("--workdir", str(root / "gpu-work"), "--stages", "gpu", "--pack", "--out", str(packed))
    with tarfile.open(packed / "gold_work.tar.gz") as tar:
        tar.extractall(root / "cpu-work", filter="data")
    run("--workdir", str(root / "cpu-work"), "--stages", "cpu", "--out", str(out))
    return {"results": json.loads((out / "results.json").read_text()), "out": out, "packed": packed}


def rows(results: dict, dim: str, method: str) -> list[dict]:
    return [r for r in results["methods"][dim] if r["method"] == method]


def test_every_output_is_written(smoke: dict) -> None:
    names = {p.name for p in smoke["out"].iterdir()}
    assert {"results.json", "results.md", "frontier_positive.png", "frontier_objective.png", "frontier_2d.png"} <= names
    packed = sorted(p.name for p in smoke["packed"].iterdir())
    assert len(packed) <= 8, "at most 8 files come back from the device machine"
    for key, arm in smoke["results"]["arms"].items():
        assert f"gold_arm_{key.split('/')[0]}-{arm['recipe']}.tar.gz" in packed, (key, packed)


def test_engine_log_probs_are_the_fp32_fused_distribution(smoke: dict) -> None:
    # float32 on the CPU: the guided engine's reported log-probs equal the teacher-forced fusion.
    check = smoke["results"]["engine_check"]
    assert check["zero"]["max"] < 1e-4
    assert check["max_p99"] < 1e-3
    for row in rows(smoke["results"], "positive", "GenARM"):
        assert row["kl"] == pytest.approx(row["kl_engine_logprobs"], abs=1e-2)


def test_best_of_n_is_selected_right(smoke: dict) -> None:
    results = smoke["results"]
    for dim in ("positive", "objective"):
        oracle = rows(results, dim, "best-of-N (gold, oracle)")
        golds = [r["gold"] for r in oracle]
        assert golds == sorted(golds), "picking by gold over more samples cannot lower the gold"
        for r in oracle + rows(results, dim, "best-of-N (ARM reward)"):
            n = int(r["setting"].removeprefix("N="))
            assert r["kl"] == pytest.approx(math.log(n) - (n - 1) / n)


def test_best_of_n_picks_the_highest_score_among_the_first_n() -> None:
    import numpy as np

    from bench.gold.report import select_best_of_n

    scores = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, -1.0, 0.0, 0.0]])
    assert select_best_of_n(scores, 1).tolist() == [0, 0]
    assert select_best_of_n(scores, 3).tolist() == [1, 0]
    assert select_best_of_n(scores, 4).tolist() == [3, 0]
    with pytest.raises(ValueError):
        select_best_of_n(scores, 5)


def test_every_method_has_gold_kl_guard_and_cost(smoke: dict) -> None:
    results = smoke["results"]
    methods = {r["method"] for r in results["methods"]["positive"]}
    assert {"base", "GenARM", "best-of-N (ARM reward)", "best-of-N (gold, oracle)", "ARGS", "DPO"} <= methods
    for r in results["methods"]["positive"]:
        assert {"gold", "kl", "relevance", "distinct2", "tokens_per_s", "forwards_per_token"} <= set(r), r
        assert r["tokens_per_s"] > 0
    base_t1 = next(r for r in rows(results, "positive", "base") if r["setting"] == "T=1")
    assert base_t1["kl"] == 0.0  # the base at T=1 is the base
    assert len(results["grid"]) == 4 and {"positive", "objective"} <= set(results["grid"][0])
