"""`genarm-train`: train an autoregressive reward model (ARM) from preference pairs.

    genarm-train --model PATH --data PATH --dimension harmless --out DIR
    genarm-train --config rm_training/configs/hh_harmless_lora.yaml [--flags that override it]
    accelerate launch --config_file rm_training/configs/accelerate_ddp.yaml -m rm_training.cli --config ...

Every setting of rm_training.config.TrainConfig can be given in the YAML file (`--config`) or as
a flag (`--learning-rate 1e-4`); flags win. `--resume` continues from the newest complete
checkpoint under OUT/checkpoints after a crash or kill.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rm_training.config import (  # noqa: E402
    DATA_FORMATS,
    MODES,
    ConfigError,
    TrainConfig,
    build_config,
    load_yaml,
)

HELP = {
    "model": "causal LM to train the ARM from: HF folder, hub id, or a genarm_common.model_fetch name "
             "(smollm2-135m-instruct, ...); it must share the base model's tokenizer",
    "data": "preference data: .jsonl/.json/.parquet (optionally .gz), a folder of them, a datasets hub name, "
            "or builtin:hh-rlhf (the bundled 2,000 HH-RLHF harmless pairs)",
    "dimension": "reward dimension the ARM scores, e.g. harmless, helpful (the server's ARM name)",
    "out": "output folder: adapter/, merged/, checkpoints/, curves.png",
    "base_model": "the base the ARM will guide (recorded; its tokenizer is checked against the model's)",
    "data_format": f"record format: {', '.join(DATA_FORMATS)}",
    "mode": f"training mode: {', '.join(MODES)} (default lora, the official recipe)",
    "resume": "continue from the newest complete checkpoint in OUT/checkpoints",
    "merge": "also write OUT/merged: the adapter merged into a plain HF folder",
    "heldout_fraction": "share of prompts held out for evaluation (default 0.1)",
    "beta_r": "ARM loss temperature (default 0.05 LoRA / 0.1 full)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genarm-train",
        description="Train a GenARM autoregressive reward model (TRL + PEFT) from preference pairs.",
    )
    parser.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = HELP.get(f.name, f.name.replace("_", " "))
        if default not in (None, "", dataclasses.MISSING):
            help_text += f" (default: {','.join(default) if isinstance(default, list) else default})"
        if kind.startswith("bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, default=None, help=help_text + " (comma-separated)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    config_file = values.pop("config")
    file_values = load_yaml(config_file) if config_file else {}
    cfg = build_config(file_values, values)
    if cfg.command is None:
        cfg.command = "genarm-train " + " ".join(argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv)
        from rm_training.pipeline import train_arm
        from rm_training.preference_data import DataError

        try:
            train_arm(cfg)
        except DataError as err:
            raise ConfigError(str(err)) from None
    except ConfigError as err:
        print(f"genarm-train: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from rm_training.trainer import TrainingDiverged

        if not isinstance(err, TrainingDiverged):
            raise
        print(f"genarm-train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("genarm-train: interrupted; continue later with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
