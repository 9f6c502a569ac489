"""The ARM trainer: TRL's DPOTrainer, made reference-free, plus the PEFT / DPOConfig wiring.

GenARM's loss is DPO's sigmoid loss with no reference model on summed response log-probs:

    L = -log sigmoid(beta_r * (sum_t log pi(y_w,t | x, y_w,<t) - sum_t log pi(y_l,t | x, y_l,<t)))

TRL 1.16's DPOTrainer already sums the per-token log-probs (`ld_alpha=None`) and uses the sigmoid
loss (`loss_type=["sigmoid"]`), but it has no reference-free switch (the 0.x `reference_free` flag
is gone): it always subtracts reference log-probs, taken from a reference model, from the policy
with its adapter disabled, or, with `precompute_ref_log_probs=True`, from columns of the dataset
that it fills once before training. So ARMTrainer sets `precompute_ref_log_probs=True` and
overrides the one method that fills those columns to write the reference-free value, 0, without
any forward pass. Nothing else of TRL's loss, batching, logging or checkpointing is replaced.
(`precompute_ref_log_probs` also keeps TRL from loading a reference copy of the model, except
under FSDP full fine-tuning, where TRL loads one at start-up and frees it; prefer DeepSpeed there.)

A second override skips TRL's tokenization for datasets that rm_training.preference_data already
tokenized (the same rules as TRL's, plus the truncation and bad-record rules of the issue).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import DPOConfig, DPOTrainer

from rm_training.config import TrainConfig

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Fault injection for the resume test: SIGKILL this process at the end of optimizer step N.
KILL_ENV = "GENARM_TRAIN_KILL_AT_STEP"


class ARMTrainer(DPOTrainer):
    """DPOTrainer with a reference log-prob of 0 for every response (see the module docstring)."""

    _tag_names = ["trl", "dpo", "genarm-arm"]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # tokenized by rm_training.preference_data
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Reference-free: log pi_ref(y | x) := 0, so TRL's logratios are the policy's own summed log-probs.
        for column in REF_COLUMNS:
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, [0.0] * len(dataset))
        return dataset

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Remember each eval batch's size, so that log() can weight the batch means by pairs.
        self._eval_batch_pairs = getattr(self, "_eval_batch_pairs", [])
        self._eval_batch_pairs.append(int(inputs["input_ids"].shape[0]) // 2)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL logs rewards/* as beta * logratio, one mean per batch; also log the ARM's own
        # quantities, r = summed log-prob: accuracy = share of pairs with r(chosen) > r(rejected),
        # margin = mean r(chosen) - r(rejected), over pairs (a short last eval batch weighs less).
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        accuracies, margins = metrics.get("rewards/accuracies"), metrics.get("rewards/margins")
        if accuracies and margins:
            sizes = getattr(self, "_eval_batch_pairs", []) if mode == "eval" else []
            if len(sizes) != len(accuracies):
                sizes = [1] * len(accuracies)
            total = sum(sizes)
            metrics["accuracy"] = [sum(a * n for a, n in zip(accuracies, sizes, strict=True)) / total]
            metrics["margin"] = [sum(m * n for m, n in zip(margins, sizes, strict=True)) / total / self.beta]
        if mode == "eval":
            self._eval_batch_pairs = []
        super().log(logs, start_time)


class KillAtStep(TrainerCallback):
    """Test hook: SIGKILL the process once optimizer step `step` has finished (no clean-up runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message is one line for the user."""


class DivergenceGuard(TrainerCallback):
    """Stops training at the first logged non-finite gradient norm or loss. Without it a diverged run
    trains to the end and saves an ARM that scores nothing (seen: Qwen2.5 LoRA in bf16 on an H200,
    grad norm NaN from the first step, held-out accuracy 0.0); transformers' `logging_nan_inf_filter`
    even hides the NaN losses from the logs."""

    def __init__(self) -> None:
        self.found: tuple[int, str, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("grad_norm", "loss", "eval_loss"):
            value = (logs or {}).get(key)
            if self.found is None and isinstance(value, (int, float)) and not math.isfinite(value):
                self.found = (state.global_step, key, float(value))
                control.should_training_stop = True

    def check(self, cfg: TrainConfig, bf16: bool) -> None:
        if self.found is None:
            return
        step, key, value = self.found
        hint = "--no-bf16 (fp32), " if bf16 else ""
        raise TrainingDiverged(
            f"training diverged: {key} {value} at step {step}{' in bf16' if bf16 else ''}; no ARM was saved. "
            f"Try {hint}a lower --learning-rate (now {cfg.learning_rate:g}) or --attn-implementation eager"
        )


def fault_injection_callbacks() -> list[TrainerCallback]:
    value = os.environ.get(KILL_ENV)
    return [KillAtStep(int(value))] if value else []


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def optimizer_steps(cfg: TrainConfig, n_train: int, world_size: int) -> int:
    """Optimizer steps the Trainer will run (as transformers counts them)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(n_train / (cfg.per_device_batch_size * world_size))
    accumulation = cfg.accumulation_steps(world_size)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(per_epoch * cfg.epochs)


def model_init_kwargs(cfg: TrainConfig, bf16: bool) -> tuple[dict[str, Any], Any]:
    """(kwargs for from_pretrained, quantization config) for the mode."""
    kwargs: dict[str, Any] = {"device_map": None}
    quantization = None
    if cfg.mode == "full":
        kwargs["dtype"] = "float32"  # fp32 master weights; bf16 autocast when bf16 is on
    elif cfg.mode == "lora":
        kwargs["dtype"] = "bfloat16" if bf16 else "float32"  # frozen base in bf16, adapter in fp32
    else:  # qlora
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["dtype"] = "bfloat16"
        kwargs["device_map"] = {"": PartialState().local_process_index}
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs, quantization


def lora_config(cfg: TrainConfig):
    if cfg.mode == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def dpo_config(cfg: TrainConfig, checkpoint_dir: Path, n_train: int, has_eval: bool, world_size: int) -> DPOConfig:
    bf16 = bf16_available() if cfg.bf16 is None else cfg.bf16
    steps = optimizer_steps(cfg, n_train, world_size)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(100, math.ceil(0.1 * steps))
    eval_steps = cfg.eval_steps or max(1, steps // 10)
    init_kwargs, _ = model_init_kwargs(cfg, bf16)
    return DPOConfig(
        output_dir=str(checkpoint_dir),
        # The ARM loss: sigmoid, summed log-probs, reference-free (see ARMTrainer).
        beta=cfg.beta_r,
        loss_type=["sigmoid"],
        ld_alpha=None,
        precompute_ref_log_probs=True,
        max_length=cfg.max_length,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        truncation_mode="keep_start",
        disable_dropout=cfg.disable_dropout,
        model_init_kwargs=init_kwargs,
        # Optimisation
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(world_size),
        gradient_checkpointing=cfg.gradient_checkpointing,
        # Every trainable parameter (LoRA or full) takes part in every step's loss, so DDP need not
        # walk the autograd graph for unused ones after each backward (transformers turns that
        # search on for a PEFT model); a CPU-bound step of a small ARM pays for that walk.
        ddp_find_unused_parameters=False,
        bf16=bf16,
        fp16=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Bookkeeping
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_on_start=has_eval,  # the curves start at the untrained model's held-out accuracy
        report_to=cfg.report_to,
        disable_tqdm=not cfg.progress,
        dataset_num_proc=cfg.dataset_num_proc,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def build_trainer(
    cfg: TrainConfig,
    train_dataset,
    eval_dataset,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint_dir: Path,
    world_size: int = 1,
    callbacks: list[TrainerCallback] | None = None,
) -> ARMTrainer:
    """An ARMTrainer for a resolved config and tokenized datasets (model loaded by TRL from cfg.model)."""
    args = dpo_config(cfg, checkpoint_dir, len(train_dataset), eval_dataset is not None, world_size)
    _, quantization = model_init_kwargs(cfg, args.bf16)
    return ARMTrainer(
        model=cfg.model,
        ref_model=None,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        quantization_config=quantization,
        callbacks=[*(callbacks or []), DivergenceGuard(), *fault_injection_callbacks()],
    )


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_PREFIX = "checkpoint-"
# Written last by transformers' _save_checkpoint: a folder without it was cut off mid-save.
COMPLETE_MARKER = "trainer_state.json"


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            suffix = path.name[len(CHECKPOINT_PREFIX):]
            if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
                found.append((int(suffix), path))
    return sorted(found)


def newest_complete_checkpoint(checkpoint_dir: Path, set_aside_incomplete: bool = True) -> Path | None:
    """The newest checkpoint that was completely written; newer, incomplete ones are renamed aside."""
    for step, path in reversed(list_checkpoints(checkpoint_dir)):
        if (path / COMPLETE_MARKER).is_file():
            return path
        if set_aside_incomplete:
            path.rename(path.with_name(f"incomplete-{path.name}"))
    return None
