"""Training configuration: one dataclass, filled from defaults < YAML file < command line.

Defaults follow the official GenARM recipe (../shared/genarm.md):
- LoRA (the default mode): r=8, alpha=16, dropout 0.05 on q/k/v, beta_r 0.05, lr 5e-4 cosine,
  warmup 100 steps, 1 epoch, batch 32, max prompt 512 / max length 1024.
- QLoRA: the same on a 4-bit (NF4) base; needs bitsandbytes and a CUDA GPU.
- Full fine-tune (the Tulu2 recipe): beta_r 0.1, lr 5e-7, 3 epochs, length 2048.
Values left at None are filled from the mode's preset by `resolve()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genarm_common.settings import load_settings

MODES = ("lora", "qlora", "full")
DATA_FORMATS = ("auto", "pairs", "hh", "pku", "messages")

# Per-mode defaults for the fields that are None in TrainConfig.
MODE_PRESETS: dict[str, dict[str, Any]] = {
    "lora": {"beta_r": 0.05, "learning_rate": 5e-4, "epochs": 1.0, "max_length": 1024, "max_prompt_length": 512},
    "qlora": {"beta_r": 0.05, "learning_rate": 5e-4, "epochs": 1.0, "max_length": 1024, "max_prompt_length": 512},
    "full": {"beta_r": 0.1, "learning_rate": 5e-7, "epochs": 3.0, "max_length": 2048, "max_prompt_length": 1024},
}


class ConfigError(ValueError):
    """A bad training setting; the message is one line for the user."""


@dataclass
class TrainConfig:
    # What to train
    model: str = ""  # HF folder (or hub id where a hub is reachable); must share the base's tokenizer
    data: str = ""  # preference file / folder (jsonl, json, parquet, .gz) or a `datasets` hub name
    dimension: str = "harmless"  # the reward dimension this ARM scores (the server's ARM name)
    out: str = "arm-out"
    base_model: str | None = None  # the base the ARM will guide (recorded in genarm_arm.json); default: model

    # Data
    data_format: str = "auto"  # auto | pairs | hh | pku | messages (UltraFeedback-binarized style)
    data_split: str | None = None  # hub datasets: the split (default "train"; UltraFeedback: "train_prefs")
    data_dir: str | None = None  # hub datasets: sub-folder (e.g. "harmless-base" of Anthropic/hh-rlhf)
    pku_label: str | None = None  # PKU-SafeRLHF: "better" or "safer" (default from dimension)
    max_records: int | None = None  # read at most this many records (before filtering)
    heldout_fraction: float = 0.1  # share of prompts held out for evaluation (by a seeded hash of the prompt)
    heldout_data: str | None = None  # a separate held-out file instead of the split
    split_seed: int = 0
    use_chat_template: bool = True  # use the tokenizer's chat template when it has one
    system_prompt: str | None = None  # prepended as a system message (chat template only)
    max_length: int | None = None  # prompt + response tokens (responses are cut to fit)
    max_prompt_length: int | None = None  # older turns are dropped to fit; a prompt still too long is skipped

    # Method
    mode: str = "lora"
    beta_r: float | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05  # note: disable_dropout (TRL's default, as in the official run) zeroes it
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    disable_dropout: bool = True

    # Optimisation
    learning_rate: float | None = None
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = None  # default: min(100, 10% of the optimizer steps)
    weight_decay: float = 0.0
    epochs: float | None = None
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32  # pairs per optimizer step, all devices together
    per_device_batch_size: int = 8  # pairs per forward; gradient accumulation makes up the rest
    eval_batch_size: int | None = None  # default: per_device_batch_size
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on when a CUDA GPU supports it
    seed: int = 42
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    # Batch lengths rounded up to a multiple of this (None: the longest sequence). Fewer distinct
    # shapes: on an H200, cuDNN attention spent ~80 ms of CPU per step planning each new length
    # (bench/results/train_profile_gpu.txt). Padding is masked; the loss is unchanged.
    pad_to_multiple_of: int | None = 64

    # Bookkeeping
    save_steps: int = 100  # checkpoint every N optimizer steps (under out/checkpoints)
    save_total_limit: int = 2
    eval_steps: int | None = None  # default: about 10 evaluations per run
    logging_steps: int = 10
    resume: bool = False  # continue from the newest complete checkpoint under out/checkpoints
    merge: bool = False  # also write out/merged (a plain HF folder with the LoRA merged in)
    plot: bool = True
    dataset_num_proc: int | None = None
    dataloader_num_workers: int = 0
    report_to: str = "none"
    progress: bool = True  # tqdm progress bars
    command: str | None = None  # the command line that started the run (recorded in genarm_arm.json)

    def resolve(self, world_size: int = 1) -> TrainConfig:
        """A copy with every None filled in and every value checked; raises ConfigError."""
        cfg = dataclasses.replace(self)
        if cfg.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
        if cfg.data_format not in DATA_FORMATS:
            raise ConfigError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {cfg.data_format!r}")
        if not cfg.model:
            raise ConfigError("a model is needed (--model PATH)")
        if not cfg.data:
            raise ConfigError("preference data are needed (--data PATH or dataset name)")
        if not cfg.dimension or not cfg.dimension.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"dimension {cfg.dimension!r}: use letters, digits, '-' or '_' (it names the ARM)")
        for key, value in MODE_PRESETS[cfg.mode].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.base_model is None:
            cfg.base_model = cfg.model
        if cfg.eval_batch_size is None:
            cfg.eval_batch_size = cfg.per_device_batch_size
        if cfg.beta_r <= 0 or not math.isfinite(cfg.beta_r):
            raise ConfigError(f"beta_r must be a positive number, got {cfg.beta_r}")
        if cfg.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {cfg.learning_rate}")
        if not 0 <= cfg.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
        if cfg.max_prompt_length >= cfg.max_length:
            raise ConfigError(
                f"max_prompt_length ({cfg.max_prompt_length}) must be below max_length ({cfg.max_length}): "
                "responses need room"
            )
        for name in ("batch_size", "per_device_batch_size", "eval_batch_size", "save_steps", "logging_steps",
                     "lora_r", "max_length", "max_prompt_length"):
            if int(getattr(cfg, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
        if cfg.pad_to_multiple_of is not None and int(cfg.pad_to_multiple_of) < 1:
            raise ConfigError(f"pad_to_multiple_of must be a positive integer or unset, got {cfg.pad_to_multiple_of}")
        per_step = cfg.per_device_batch_size * world_size
        if cfg.batch_size % per_step:
            raise ConfigError(
                f"batch_size ({cfg.batch_size}) must be a multiple of per_device_batch_size x devices "
                f"({cfg.per_device_batch_size} x {world_size})"
            )
        if cfg.pku_label is not None and cfg.pku_label not in ("better", "safer"):
            raise ConfigError(f"pku_label must be 'better' or 'safer', got {cfg.pku_label!r}")
        if cfg.mode == "qlora":
            _check_qlora_possible()
        return cfg

    def accumulation_steps(self, world_size: int = 1) -> int:
        return max(1, self.batch_size // (self.per_device_batch_size * world_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_qlora_possible() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError("mode qlora needs a CUDA GPU (bitsandbytes 4-bit); use mode lora on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("mode qlora needs the bitsandbytes package (pip install bitsandbytes)")


FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of TrainConfig fields (keys may be spelled like flags: learning-rate)."""
    return load_settings(path, FIELD_NAMES, ConfigError, dashes=True)


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """TrainConfig from YAML values, then command-line values (None = not given) on top."""
    values = dict(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in list(values.items()):
        values[key] = _coerce(key, value, str(types[key]))
    return TrainConfig(**values)


def _coerce(key: str, value: Any, type_name: str) -> Any:
    if value is None:
        return None
    try:
        if type_name.startswith("bool"):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes", "on")
            return bool(value)
        if type_name.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        if type_name.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if type_name.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {key}: {value!r} is not a valid {type_name}") from None
    return value
