"""Experiment configuration: one dataclass, from a YAML file (`--config`) or the tiny smoke preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genarm_common.settings import SettingsFile


@dataclass
class ArgsSettings:
    weight: float = 1.0  # w in base_logprob + w * r_judge (results key "args")
    extra_weights: list[float] = field(default_factory=list)  # more ARGS runs ("args_w<w>")
    top_k: int = 10
    n_prompts: int | None = None  # None: all evaluation prompts
    batch_size: int = 25
    reference_genarm_weight: float | None = 1.0  # also time GenARM greedy on the reference decoder


@dataclass
class JudgeSettings:
    features: list[str] = field(default_factory=lambda: ["resp", "resp+inter", "concat"])
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    max_seq_length: int = 256  # MiniLM's own limit
    max_train_pairs: int | None = None


@dataclass
class PositiveSettings:
    """The second ARM ('positive' sentiment): pairs of base samples on TRAIN prompts, labelled by VADER."""

    enabled: bool = True
    train_prompts: int = 400
    temperature: float = 1.0
    min_gap: float = 0.1  # |VADER(a) - VADER(b)| <= this: a tie, skipped
    out: str | None = None  # ARM training folder (default: WORKDIR/positive-arm)
    arm: str | None = None  # use this ARM (adapter or HF folder) instead of training one
    train_args: list[str] = field(default_factory=lambda: [
        "--max-length", "192", "--max-prompt-length", "128", "--batch-size", "16", "--per-device-batch-size", "8",
        "--epochs", "1", "--no-bf16", "--logging-steps", "1", "--save-steps", "1000", "--eval-steps", "1000",
        "--no-progress",
        # Every prompt here is on the TRAIN side of the harmless split (seed 0): another seed holds 10% out.
        "--split-seed", "1",
    ])


@dataclass
class MultiSettings:
    grid: dict[str, list[float]] = field(default_factory=lambda: {"harmless": [0.0, 1.0, 2.0], "positive": [0.0, 1.0, 2.0]})
    n_prompts: int | None = None


@dataclass
class ExperimentConfig(SettingsFile):
    name: str = "quality"
    base: str = "smollm2-135m-instruct"  # genarm_common.model_fetch name or HF folder
    arms: dict[str, str] = field(default_factory=dict)  # dimension -> LoRA adapter (merged on use) or HF folder
    split_from: str = "harmless"  # the ARM whose train / held-out split the experiment reuses
    split: dict[str, Any] | None = None  # split settings, where that ARM recorded none (see data.SplitSettings)
    max_records: int | None = None  # read at most this many preference records (smoke)
    n_prompts: int = 100
    max_new_tokens: int = 64
    temperature: float = 0.7
    seed: int = 20251125
    genarm_weights: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    greedy_weights: list[float] = field(default_factory=lambda: [0.0, 1.0])  # 0 = base greedy
    temperature_controls: list[float] = field(default_factory=list)  # base sampled at these temperatures too
    check_zero_weight: bool = False  # also sample GenARM w=0 in the guided engine (must equal the base)
    best_of: list[int] = field(default_factory=lambda: [4, 16])
    arm_alone: bool = True
    args: ArgsSettings = field(default_factory=ArgsSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    positive: PositiveSettings = field(default_factory=PositiveSettings)
    multi: MultiSettings | None = field(default_factory=MultiSettings)
    engine_args: dict[str, Any] = field(default_factory=lambda: {
        "dtype": "bfloat16", "max_model_len": 512, "max_num_seqs": 128, "max_num_batched_tokens": 4096,
        "enable_chunked_prefill": False, "enable_prefix_caching": True, "seed": 0,
    })
    kv_cache_gib: int = 4
    threads: int = 1  # torch / OpenMP threads per process (1: robust on a shared machine; more spin-waits when cores are busy)
    nice: int = 5
    workdir: str = "/work/runs/quality"
    reference_dtype: str = "float32"  # ARGS / drift / reference-decoder timing in transformers


def smoke_config(tiny: dict[str, Path], workdir: Path) -> ExperimentConfig:
    """The whole pipeline on the tiny random-weight family (tests/tiny_family.py): minutes, not hours."""
    return ExperimentConfig(
        name="smoke",
        base=str(tiny["llama-base"]),
        arms={"harmless": str(tiny["llama-arm-narrow"])},
        max_records=240,
        split={"max_length": 160, "max_prompt_length": 128},
        n_prompts=6,
        max_new_tokens=12,
        genarm_weights=[1.0, 4.0],
        greedy_weights=[0.0, 1.0],
        check_zero_weight=True,
        best_of=[2, 4],
        args=ArgsSettings(weight=1.0, top_k=3, n_prompts=4, batch_size=4),
        judge=JudgeSettings(features=["resp", "resp+inter"], c_grid=[1.0], max_seq_length=48, max_train_pairs=120),
        positive=PositiveSettings(train_prompts=48, temperature=1.0, min_gap=0.0, train_args=[
            "--max-length", "96", "--max-prompt-length", "64", "--batch-size", "8", "--per-device-batch-size", "8",
            "--max-steps", "2", "--learning-rate", "1e-2", "--no-bf16", "--logging-steps", "1", "--save-steps", "1000",
            "--eval-steps", "1000", "--no-progress", "--no-plot", "--split-seed", "1", "--heldout-fraction", "0.3",
        ]),
        multi=MultiSettings(grid={"harmless": [0.0, 1.0], "positive": [0.0, 2.0]}, n_prompts=4),
        engine_args={"dtype": "float32", "max_model_len": 512, "max_num_seqs": 16, "max_num_batched_tokens": 2048,
                     "enable_chunked_prefill": False, "enable_prefix_caching": True, "seed": 0,
                     "enforce_eager": True},  # no torch.compile: engines start in seconds
        kv_cache_gib=1,
        nice=0,
        workdir=str(workdir),
    )
