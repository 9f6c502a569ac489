"""bench/train_gpu.py ddp --smoke: the user's accelerate launch of rm_training.cli, read back into a table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import train_gpu


def test_ddp_smoke_runs_the_user_command_and_reads_its_outputs(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = train_gpu.main(["ddp", "--smoke", "--model", str(tiny_family["llama-base"]), "--gpus", "1", "2",
                         "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--timeout-s", "300"])
    report = json.loads((out / "train_ddp.json").read_text())
    one = report["runs"][0]
    assert rc == 0, one.get("error")
    assert one["command"].split()[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert "--num_processes 1" in one["command"] and "--heldout-data" in one["command"]
    assert one["ddp_check"] == "ok" and one["train_steps"] == 2 and one["pairs_per_s"] > 0
    assert 0 < one["heldout_pairs"] <= 12 and 0 <= one["heldout_accuracy"] <= 1
    assert (tmp_path / "runs" / "ddp-1" / "adapter" / "genarm_arm.json").is_file()
    assert report["environment_vars"]["NCCL_NVLS_ENABLE"] == "0"
    if not torch.cuda.is_available():  # no multi-process CPU mode in rm_training.pipeline
        assert report["runs"][1]["skipped"].startswith("skipped")
    table = (out / "train_ddp.md").read_text()
    assert "| 1 | " in table and "1.00x" in table
    assert sorted(p.name for p in out.iterdir()) == ["train_ddp.json", "train_ddp.md", "train_ddp_1.log"]
