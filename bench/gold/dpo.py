"""DPO (Rafailov et al. 2023) on the same gold pairs and base: the paper's reference point.

TRL's DPOTrainer with LoRA (the policy with its adapter disabled is the reference), the ARM
recipe's optimisation settings, one policy per beta; the adapter is merged (server.adapters) so it
can be sampled like any model."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from rm_training.config import TrainConfig


def train_dpo(base: str, pairs_file: Path, out: Path, beta: float, settings: dict[str, Any]) -> dict[str, Any]:
    import datasets
    from trl import DPOTrainer

    from rm_training.pipeline import load_training_tokenizer
    from rm_training.trainer import dpo_config, lora_config
    from server.adapters import merge_adapter

    records = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    cfg = TrainConfig(model=base, data=str(pairs_file), dimension="dpo", out=str(out), **settings).resolve()
    tokenizer = load_training_tokenizer(base)
    args = dataclasses.replace(
        dpo_config(cfg, out / "checkpoints", len(dataset), False, 1),
        beta=beta, precompute_ref_log_probs=False, save_strategy="no",
    )
    trainer = DPOTrainer(model=base, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(cfg))
    started = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - started
    adapter = out / "adapter"
    trainer.model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    merged = merge_adapter(adapter, base)
    return {"beta": beta, "pairs": len(dataset), "train_loss": float(result.training_loss), "train_s": seconds,
            "pairs_per_s": len(dataset) * float(cfg.epochs or 1) / seconds, "merged": str(merged),
            "adapter": str(adapter)}
