"""Settings of the gold-judge experiment: the GPU run, a small real-model run for the CPU, and the
tiny smoke preset the tests run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genarm_common.settings import SettingsFile


@dataclass
class ArmRecipe:
    """genarm-train settings (rm_training.config.TrainConfig fields) for one ARM."""

    name: str = "official"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class GoldConfig(SettingsFile):
    name: str = "gold"
    base: str = "smollm2-135m-instruct"  # genarm_common.model_fetch name or an HF folder
    dimensions: list[str] = field(default_factory=lambda: ["positive", "objective"])
    # Prompts: first user turns of the bundled HH-RLHF dialogues, split by a seeded hash.
    heldout_prompts: int = 250
    train_prompts: int = 1800
    max_prompt_tokens: int = 128
    split_seed: int = 0
    max_records: int | None = None
    # Base samples that become gold-labelled pairs.
    samples_per_prompt: int = 8
    max_new_tokens: int = 96
    pair_min_gap: dict[str, float] = field(default_factory=lambda: {"positive": 0.3, "objective": 0.2})
    pairs_per_prompt: int = 2  # (best, worst), (second best, second worst), ...
    # ARMs: one recipe per dimension, plus ablations on the first dimension ("what moved it").
    arm_recipe: ArmRecipe = field(default_factory=ArmRecipe)
    arm_ablations: list[ArmRecipe] = field(default_factory=list)
    # DPO (TRL, LoRA, the same pairs and base) on the first dimension, one policy per beta.
    dpo_betas: list[float] = field(default_factory=lambda: [0.1, 0.5])
    dpo_settings: dict[str, Any] = field(default_factory=dict)
    # Evaluation on the held-out prompts, T=1.
    eval_samples: int = 2  # samples per prompt per setting
    genarm_weights: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0, 2.0, 4.0])
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85, 1.0])
    best_of: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64])
    grid_weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    args_weights: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])
    args_top_k: int = 10
    args_prompts: int = 250
    # Engines and scoring
    engine_args: dict[str, Any] = field(default_factory=lambda: {
        "dtype": "bfloat16", "max_model_len": 512, "max_num_seqs": 512, "enable_prefix_caching": True, "seed": 0,
    })
    teacher_batch: int = 64
    hf_dtype: str = "float32"  # teacher forcing, DPO sampling, ARGS (the reference decoder)
    device: str = "auto"  # auto: cuda if available
    workdir: str = "/tmp/genarm-gold"
    seed: int = 20261130


def smoke_config(tiny: dict[str, Path], workdir: Path) -> GoldConfig:
    """Every stage on the tiny random-weight family (tests/tiny_family.py), in minutes on a CPU."""
    tiny_train = {"max_steps": 2, "batch_size": 8, "per_device_batch_size": 8, "learning_rate": 1e-2,
                  "max_length": 96, "max_prompt_length": 64, "bf16": False, "plot": False, "progress": False,
                  "logging_steps": 1, "save_steps": 1000, "eval_steps": 1000}
    return GoldConfig(
        name="smoke", base=str(tiny["llama-base"]), heldout_prompts=6, train_prompts=24, max_prompt_tokens=48,
        max_records=200, samples_per_prompt=4, max_new_tokens=8,
        pair_min_gap={"positive": 0.0, "objective": 0.0}, pairs_per_prompt=1,
        arm_recipe=ArmRecipe("official", tiny_train),
        arm_ablations=[ArmRecipe("all-linear", {**tiny_train, "lora_target_modules": ["q_proj", "v_proj", "up_proj"]})],
        dpo_betas=[0.1], dpo_settings=tiny_train,
        eval_samples=1, genarm_weights=[1.0, 4.0], temperatures=[0.7, 1.0], best_of=[2, 4],
        grid_weights=[0.0, 2.0], args_weights=[1.0], args_top_k=3, args_prompts=3,
        engine_args={"dtype": "float32", "max_model_len": 256, "max_num_seqs": 16, "enable_prefix_caching": True,
                     "seed": 0, "enforce_eager": True},
        teacher_batch=8, workdir=str(workdir),
    )
