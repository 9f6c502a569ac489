"""bench/quality/weak_to_strong.py --smoke: a smaller Qwen2 ARM (trained by genarm-train) guides a
larger Qwen2 base with a padded vocabulary, through the quality harness; tiny random models, CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_weak_to_strong_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "GENARM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench.quality.weak_to_strong", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    status = json.loads((tmp_path / "weak_to_strong.json").read_text())
    assert status["status"].startswith("ran") and "arm_training" in status
    results = json.loads((tmp_path / "results.json").read_text())
    arms = results["setup"]["models"]["arms"]
    assert "qwen2-arm" in arms["harmless"]["trained"]["command"]  # the ARM was trained from the smaller model
    assert results["setup"]["models"]["base"]["path"].endswith("qwen2-base")
    for key in ("base", "genarm_w1", "best_of_2", "arm_alone"):
        assert {"judge_reward", "win_rate_vs_base", "tokens_per_s"} <= set(results[key])
