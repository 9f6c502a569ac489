"""One ARM training run: data -> TRL trainer -> checkpoints -> evaluation -> export -> plot -> summary.

    from rm_training.config import TrainConfig
    from rm_training.pipeline import train_arm
    result = train_arm(TrainConfig(model="path/to/model", data="pairs.jsonl", dimension="harmless", out="arm"))

Works unchanged under `accelerate launch` (DDP, FSDP, DeepSpeed): every rank prepares the same data
(deterministic), only the main process writes files other than checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rm_training.config import ConfigError, TrainConfig
from rm_training.preference_data import PreparedData, prepare_data

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class TrainResult:
    out: Path
    adapter_dir: Path | None
    merged_dir: Path | None
    metrics: dict[str, Any]
    data_report: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    curves_png: Path | None = None
    resumed_from: str | None = None


def _data_fingerprint(data: PreparedData, cfg: TrainConfig) -> str:
    payload = {
        "train": [p.index for p in data.train],
        "heldout": [p.index for p in data.heldout],
        "lengths": [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in data.train],
        "data": cfg.data,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def check_base_tokenizer(cfg: TrainConfig, tokenizer) -> str | None:
    """The ARM must share the base's tokenizer (the server refuses otherwise): check it now."""
    from genarm_common.model_checks import describe_tokenizer_difference, load_tokenizer

    if not cfg.base_model or cfg.base_model == cfg.model or not Path(cfg.base_model).expanduser().is_dir():
        return None
    base_tokenizer = load_tokenizer(Path(cfg.base_model).expanduser())
    difference = describe_tokenizer_difference(base_tokenizer, tokenizer, min(len(base_tokenizer), len(tokenizer)))
    if difference is not None:
        raise ConfigError(
            f"{cfg.model} does not share the tokenizer of the base model {cfg.base_model}: {difference}. "
            "An ARM must use the base's tokenizer for the server to fuse them."
        )
    return None


def resolve_model(name_or_path: str, state=None) -> str:
    """A local folder (made absolute), a name genarm_common.model_fetch knows (fetched once), or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    from genarm_common.model_fetch import KNOWN_MODELS, fetch_model

    if name_or_path.strip().lower() in KNOWN_MODELS:
        if state is None:
            return str(fetch_model(name_or_path))
        with state.main_process_first():
            return str(fetch_model(name_or_path))
    return name_or_path


def load_training_tokenizer(model: str):
    """The model's tokenizer, with a pad token the model can embed (padding is masked out anyway).

    Some tokenizers add a pad token past the model's embedding rows (transformers gives Qwen2
    tokenizers <|endoftext|> at id len(vocab)); padding with it would index out of the table.
    """
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = AutoConfig.from_pretrained(model).get_text_config().vocab_size
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= rows:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_arm(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    from accelerate import PartialState

    from rm_training.trainer import DivergenceGuard, build_trainer, list_checkpoints, newest_complete_checkpoint

    state = PartialState()
    world, is_main = state.num_processes, state.is_main_process
    cfg = cfg.resolve(world)
    base_was_model = cfg.base_model == cfg.model
    cfg.model = resolve_model(cfg.model, state)
    cfg.base_model = cfg.model if base_was_model else resolve_model(cfg.base_model, state)
    if cfg.command is None:
        cfg.command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    out = Path(cfg.out).expanduser().resolve()
    checkpoint_dir = out / "checkpoints"

    resume_from = None
    if list_checkpoints(checkpoint_dir):
        if not cfg.resume:
            raise ConfigError(
                f"{checkpoint_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose another --out"
            )
        resume_from = newest_complete_checkpoint(checkpoint_dir, set_aside_incomplete=is_main)
    state.wait_for_everyone()

    tokenizer = load_training_tokenizer(cfg.model)
    check_base_tokenizer(cfg, tokenizer)
    started = time.monotonic()
    data = prepare_data(
        cfg.data, tokenizer,
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, dimension=cfg.dimension,
        data_format=cfg.data_format, pku_label=cfg.pku_label, split=cfg.data_split, data_dir=cfg.data_dir,
        max_records=cfg.max_records, heldout_fraction=cfg.heldout_fraction, heldout_data=cfg.heldout_data,
        split_seed=cfg.split_seed, use_chat_template=cfg.use_chat_template, system_prompt=cfg.system_prompt,
    )
    if is_main:
        _say(f"data: {data.report['kept']} pairs kept of {data.report['records']} records "
             f"({data.report['skipped_total']} skipped), train {len(data.train)} / held-out {len(data.heldout)}, "
             f"prepared in {time.monotonic() - started:.1f} s")

    fingerprint = _data_fingerprint(data, cfg)
    run_file = checkpoint_dir / "genarm_run.json"
    if resume_from is not None and run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("data_fingerprint") != fingerprint:
            raise ConfigError(
                f"--resume: the data or split differ from those of the run in {checkpoint_dir}; "
                "resuming would not continue the same data order"
            )
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            run_file.write_text(json.dumps({"data_fingerprint": fingerprint, "config": cfg.to_dict()},
                                           indent=2, default=str) + "\n")
        _say(f"resuming from {resume_from}" if resume_from else f"checkpoints every {cfg.save_steps} steps "
             f"under {checkpoint_dir}")

    trainer = build_trainer(cfg, data.train_dataset(), data.heldout_dataset(), tokenizer, checkpoint_dir,
                            world, callbacks)
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DivergenceGuard))
    guard.check(cfg, trainer.args.bf16)

    metrics = _final_metrics(trainer, data, cfg, world, train_output)
    info = _arm_info(cfg, tokenizer, data, metrics)

    adapter_dir = merged_dir = None
    if cfg.mode == "full":
        merged_dir = out / "merged"
        trainer.save_model(str(merged_dir))
    else:
        adapter_dir = out / "adapter"
        trainer.save_model(str(adapter_dir))
    state.wait_for_everyone()
    from rm_training.export import finish_folder, merge_adapter

    curves_png = None
    if is_main:
        tokenizer.save_pretrained(adapter_dir or merged_dir)
        finish_folder(adapter_dir or merged_dir, info, "lora_adapter" if adapter_dir else "merged")
        if adapter_dir is not None and cfg.merge:
            _say("merging the adapter into a plain HF folder")
            merged_dir = merge_adapter(adapter_dir, out / "merged", base=cfg.model, info=info)
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        if cfg.plot:
            from rm_training.plots import plot_curves

            curves_png = plot_curves(trainer.state.log_history, out / "curves.png",
                                     title=f"ARM '{cfg.dimension}' from {Path(cfg.model).name}")
        print(format_summary(cfg, data, metrics, adapter_dir, merged_dir, curves_png, resume_from), flush=True)
    state.wait_for_everyone()
    return TrainResult(out, adapter_dir, merged_dir, metrics, data.report, list(trainer.state.log_history),
                       curves_png, str(resume_from) if resume_from else None)


def _final_metrics(trainer, data: PreparedData, cfg: TrainConfig, world: int, train_output) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    run = train_output.metrics
    metrics: dict[str, Any] = {
        "train_steps": trainer.state.global_step,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": train_output.training_loss,
        "train_runtime_s": run.get("train_runtime"),
        "train_pairs_per_s": run.get("train_samples_per_second"),
    }
    if data.heldout and world == 1:  # exact, pair by pair, from plain logits (rm_training.scoring)
        from rm_training.scoring import score_pairs

        scores = score_pairs(trainer.model, data.heldout, trainer.processing_class.pad_token_id,
                             cfg.eval_batch_size)
        metrics.update({
            "heldout_pairs": scores.n,
            "heldout_accuracy": scores.accuracy,
            "heldout_margin": scores.margin,
            "heldout_loss": scores.loss(cfg.beta_r),
            "heldout_metric_source": "rm_training.scoring: every held-out pair, plain forward",
        })
    elif data.heldout:  # every rank takes part in the trainer's (pair-weighted) evaluation
        evaluated = trainer.evaluate()
        metrics.update({
            "heldout_pairs": len(data.heldout),
            "heldout_accuracy": evaluated.get("eval_accuracy"),
            "heldout_margin": evaluated.get("eval_margin"),
            "heldout_loss": evaluated.get("eval_loss"),
            "heldout_metric_source": "trainer evaluation (all ranks)",
        })
    return metrics


def known_model_name(folder: str | None) -> str | None:
    """The genarm_common.model_fetch name of a model folder it wrote (genarm_source.json), else None."""
    source = Path(folder).expanduser() / "genarm_source.json" if folder else None
    if source is None or not source.is_file():
        return None
    try:
        return json.loads(source.read_text()).get("name")
    except (OSError, ValueError):
        return None


def _arm_info(cfg: TrainConfig, tokenizer, data: PreparedData, metrics: dict[str, Any]) -> dict[str, Any]:
    from rm_training.export import package_versions
    from genarm_common.model_checks import tokenizer_fingerprint

    info: dict[str, Any] = {
        "dimension": cfg.dimension,
        "base_model": cfg.base_model,
        # A name genarm_common.model_fetch can fetch anywhere (the server uses it when base_model's path is absent).
        "base_model_name": known_model_name(cfg.base_model) or known_model_name(cfg.model),
        "trained_from": cfg.model,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "tokenizer_length": len(tokenizer),
        "beta_r": cfg.beta_r,
        "mode": cfg.mode,
        "reward": "sum_t log pi_arm(y_t | x, y_<t) (summed, not length-averaged)",
        "loss": "-log sigmoid(beta_r * (r(x, y_chosen) - r(x, y_rejected))), no reference model",
        "data": data.report,
        "metrics": metrics,
        "training": {
            "learning_rate": cfg.learning_rate, "lr_scheduler": cfg.lr_scheduler, "epochs": cfg.epochs,
            "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "per_device_batch_size": cfg.per_device_batch_size, "seed": cfg.seed,
            "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16,
            "disable_dropout": cfg.disable_dropout,
        },
        "command": cfg.command,
        "versions": package_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.mode != "full":
        info["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                        "target_modules": list(cfg.lora_target_modules)}
    return info


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def format_summary(cfg, data, metrics, adapter_dir, merged_dir, curves_png, resume_from) -> str:
    report = data.report
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    mode = cfg.mode if cfg.mode == "full" else (
        f"{cfg.mode} (r={cfg.lora_r}, alpha={cfg.lora_alpha}, {','.join(cfg.lora_target_modules)})")
    split = report["split"]
    rows = [
        ("dimension", cfg.dimension),
        ("model", cfg.model),
        ("mode", mode),
        ("beta_r / lr", f"{cfg.beta_r} / {cfg.learning_rate:g} {cfg.lr_scheduler}"),
        ("data", f"{report['records']} records, {report['kept']} pairs kept ({report['rendering']})"),
        ("skipped", f"{report['skipped_total']} ({skipped})"),
        ("truncated", f"{report['responses_truncated']} responses cut, {report['prompts_shortened']} prompts shortened"),
        ("split", f"train {split['train_pairs']} / held-out {split['heldout_pairs']}"),
        ("steps", f"{metrics['train_steps']}" + (f" (resumed from {Path(resume_from).name})" if resume_from else "")),
        ("time", f"{_fmt(metrics['train_runtime_s'], '.1f')} s, {_fmt(metrics['train_pairs_per_s'], '.2f')} pairs/s"),
        ("final train loss", _fmt(metrics["final_train_loss"])),
    ]
    if "heldout_accuracy" in metrics:
        rows += [
            ("held-out accuracy", f"{_fmt(metrics['heldout_accuracy'])}  ({metrics['heldout_pairs']} pairs)"),
            ("held-out margin", f"{_fmt(metrics['heldout_margin'])} nats  (mean r(chosen) - r(rejected))"),
            ("held-out loss", _fmt(metrics["heldout_loss"])),
        ]
    if adapter_dir:
        rows.append(("adapter", str(adapter_dir)))
    if merged_dir:
        rows.append(("merged", str(merged_dir)))
    if curves_png:
        rows.append(("curves", str(curves_png)))
    width = max(len(k) for k, _ in rows)
    line = "=" * 72
    body = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    return f"\n{line}\n GenARM ARM training: summary\n{line}\n{body}\n{line}"


def _say(message: str) -> None:
    print(f"[genarm-train] {message}", file=sys.stderr, flush=True)
