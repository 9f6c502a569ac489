"""GPU run of rm_training: a real ARM from SmolLM2-135M-Instruct on the HH-RLHF pairs, and a
training-throughput comparison of our reference-free trainer with TRL's reference-based DPO.

The GPU machine has no network, and what travels to it is limited to 64 MiB per call, less than
the 98 MB GGUF: the verified GGUF is split in two halves here, parked on the machine by a first
call, joined and checked against the pinned sha256 (genarm_common.model_fetch) by the second, then
converted with genarm_common.model_fetch.convert_gguf.

Here (CPU machine, network):
    python3 -m pip download --no-deps ... -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 \\
        multiprocess==0.70.19 gguf==0.19.0
    python -m genarm_common.model_fetch smollm2-135m-instruct --gguf-only /tmp/gguf
    python bench/train_gpu.py split /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf .gpu-a .gpu-b
    python bench/train_gpu.py run --smoke            # dry run on CPU, tiny model, a few steps
GPU machine, call 1 (carry .gpu-a):  python3 bench/train_gpu.py stage .gpu-a
GPU machine, call 2 at once (carry .whl .gpu-b), see run():
    python3 bench/train_gpu.py run --parts /tmp/genarm-stage .gpu-b --out $OUT

Writes under --out (default $OUT, else ./artifacts), at most 8 files:
    train_arm_adapter.tar.gz  train_curves.png  train_genarm_arm.json  train_log_history.json
    train_throughput.json  train_throughput.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_NAME = "smollm2-135m-instruct"
STAGE = Path("/tmp/genarm-stage")
WORK = Path(os.environ.get("GENARM_BENCH_WORK", "/tmp/genarm-bench"))


def say(message: str) -> None:
    print(f"[train_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- carrying the GGUF


def split_gguf(gguf: Path, dir_a: Path, dir_b: Path) -> None:
    """Halve a GGUF into dir_a/<name>.part1 and dir_b/<name>.part2 (each under the 64 MiB limit)."""
    data_size = gguf.stat().st_size
    half = data_size // 2
    for folder in (dir_a, dir_b):
        folder.mkdir(parents=True, exist_ok=True)
    with open(gguf, "rb") as src:
        (dir_a / f"{gguf.name}.part1").write_bytes(src.read(half))
        (dir_b / f"{gguf.name}.part2").write_bytes(src.read())
    say(f"split {gguf.name} ({data_size / 2**20:.1f} MiB) into {dir_a} and {dir_b}")


def stage(dir_a: Path) -> None:
    STAGE.mkdir(parents=True, exist_ok=True)
    for part in dir_a.glob("*.part*"):
        shutil.copyfile(part, STAGE / part.name)
        say(f"parked {part.name} ({part.stat().st_size / 2**20:.1f} MiB) in {STAGE}")


def join_parts(folders: list[Path], out_dir: Path) -> Path:
    from genarm_common.model_fetch import FetchError, known_model, verify_sha256

    model = known_model(MODEL_NAME)
    parts = sorted((p for f in folders for p in f.glob(f"{model.gguf_name}.part*")), key=lambda p: p.name)
    names = [p.name for p in parts]
    if names != [f"{model.gguf_name}.part1", f"{model.gguf_name}.part2"]:
        raise FetchError(f"need {model.gguf_name}.part1 and .part2 in {folders}, found {names} (if part1 is "
                         "missing, the machine went cold between the two calls: run both again, back to back)")
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = out_dir / model.gguf_name
    with open(gguf, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    verify_sha256(gguf, model.gguf_sha256, f"joined {model.gguf_name}")
    say(f"joined and verified {gguf} (sha256 {model.gguf_sha256[:16]}...)")
    return gguf


# ----------------------------------------------------------------------------- the run


def environment() -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "fsspec", "gguf"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    return env


def tiny_model() -> Path:
    from tests.tiny_family import build_tiny_family

    return build_tiny_family(WORK / "tiny")["llama-base"]


def train_real_arm(model: Path, smoke: bool, out: Path, epochs: float = 1.0):
    from rm_training.config import TrainConfig
    from rm_training.pipeline import train_arm

    run_dir = WORK / "arm-harmless"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = TrainConfig(
        model=str(model), data="builtin:hh-rlhf", dimension="harmless", out=str(run_dir), mode="lora",
        # The official recipe (LoRA r=8/16/0.05 on q,k,v, beta_r 0.05, lr 5e-4 cosine, 1 epoch, batch 32,
        # prompt 512 / length 1024); the held-out split: 10% of prompts by sha256(seed 0, prompt).
        per_device_batch_size=16, batch_size=32, save_steps=20, logging_steps=1, epochs=epochs,
        merge=False, progress=False, command="bench/train_gpu.py run (official LoRA recipe)",
    )
    if smoke:
        cfg = dataclasses.replace(cfg, max_records=120, max_steps=4, batch_size=8, per_device_batch_size=4,
                                  max_length=256, max_prompt_length=128, eval_steps=2, save_steps=2,
                                  heldout_fraction=0.2)
    say(f"training the harmless ARM: {cfg.mode}, beta_r default, data {cfg.data}")
    result = train_arm(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "train_arm_adapter.tar.gz", "w:gz") as tar:
        tar.add(result.adapter_dir, arcname="arm-harmless-adapter",
                filter=lambda info: None if info.name.endswith("training_args.bin") else info)
    shutil.copyfile(result.adapter_dir / "genarm_arm.json", out / "train_genarm_arm.json")
    shutil.copyfile(result.out / "log_history.json", out / "train_log_history.json")
    if result.curves_png:
        shutil.copyfile(result.curves_png, out / "train_curves.png")
    return cfg, result


# ----------------------------------------------------------------------------- throughput


def _benchmark_data(model: Path, cfg, limit: int):
    """The same train-split pairs as token ids (ours) and as chat messages (TRL tokenizes them itself).

    Only pairs that need no shortening or truncation, so both tokenizations agree (checked).
    """
    import datasets

    from rm_training.pipeline import load_training_tokenizer
    from rm_training.preference_data import BadRecord, PairEncoder, adapt, heldout_score, read_records, to_dataset

    tokenizer = load_training_tokenizer(str(model))
    encoder = PairEncoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    ours, theirs = [], []
    for index, record in enumerate(read_records(cfg.data)):
        try:
            _, pair = adapt(record, "auto", "safer")
            item = encoder.encode(pair)
        except BadRecord:
            continue
        if item.truncated or item.shortened or heldout_score(item.key, cfg.split_seed) < cfg.heldout_fraction:
            continue
        ours.append(item)
        prompt = pair.messages if encoder.chat else (pair.raw_prompt or "")
        if encoder.chat:
            theirs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                           "rejected": [{"role": "assistant", "content": pair.rejected}]})
        if len(ours) >= limit:
            break
    return tokenizer, to_dataset(ours), datasets.Dataset.from_list(theirs)


class StepTimer:
    """Wall-clock time of each optimizer step (GPU synchronised), after `warmup` steps."""

    def __init__(self, warmup: int) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._sync()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer._sync()
                if state.global_step > timer.warmup:
                    timer.times.append(time.perf_counter() - timer._start)

        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0
        self.callback = _Callback()

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def throughput(model: Path, base_cfg, smoke: bool, warmup_and_steps: tuple[int, int] | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from rm_training.trainer import build_trainer, dpo_config, lora_config

    warmup, steps = warmup_and_steps or ((1, 2) if smoke else (5, 30))
    cfg = dataclasses.replace(base_cfg, max_steps=warmup + steps, save_steps=10**6, eval_steps=None,
                              logging_steps=10**6, progress=False).resolve()
    batch = cfg.batch_size
    tokenizer, ours_ds, trl_ds = _benchmark_data(model, cfg, limit=batch * (warmup + steps))
    say(f"throughput: {len(ours_ds)} pairs, {warmup} warm-up + {steps} timed steps of {batch} pairs each")
    results = {}
    variants = ("ours_reference_free", "trl_dpo_lora_ref_adapter_off", "trl_dpo_lora_ref_frozen_copy")
    for name in variants:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(warmup)
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=WORK))
        if name == "ours_reference_free":
            trainer = build_trainer(cfg, ours_ds, None, tokenizer, scratch, callbacks=[timer.callback])
        else:
            args = dataclasses.replace(dpo_config(cfg, scratch, len(trl_ds), False, 1),
                                       precompute_ref_log_probs=False)
            ref = None
            if name.endswith("frozen_copy"):
                dtype = torch.bfloat16 if args.bf16 else torch.float32
                ref = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
            trainer = DPOTrainer(model=cfg.model, ref_model=ref, args=args, train_dataset=trl_ds,
                                 processing_class=tokenizer, peft_config=lora_config(cfg),
                                 callbacks=[timer.callback])
            same = [trainer.train_dataset[i]["chosen_ids"] == ours_ds[i]["chosen_ids"]
                    and trainer.train_dataset[i]["prompt_ids"] == ours_ds[i]["prompt_ids"] for i in range(8)]
            if not all(same):
                raise RuntimeError(f"{name}: TRL's tokenization differs from ours: not the same data")
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        step_s = sum(timer.times) / len(timer.times)
        results[name] = {
            "pairs_per_s": batch / step_s,
            "step_s": step_s,
            "timed_steps": len(timer.times),
            "wall_s_incl_warmup": wall,
            "peak_gpu_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
            "reference": {"ours_reference_free": "none (reference-free ARM loss)",
                          "trl_dpo_lora_ref_adapter_off": "policy with the LoRA adapter disabled (TRL default)",
                          "trl_dpo_lora_ref_frozen_copy": "separate frozen copy of the model"}[name],
        }
        say(f"{name}: {results[name]['pairs_per_s']:.1f} pairs/s ({step_s * 1000:.0f} ms/step)")
        del trainer
        shutil.rmtree(scratch, ignore_errors=True)
    ours = results["ours_reference_free"]["pairs_per_s"]
    for name in variants:
        results[name]["speedup_of_ours"] = ours / results[name]["pairs_per_s"]
    return {
        "model": str(model), "mode": "lora (r=8, q/k/v)", "batch_pairs": batch, "max_length": cfg.max_length,
        "bf16": bool(dpo_config(cfg, WORK, 1, False, 1).bf16), "gradient_checkpointing": cfg.gradient_checkpointing,
        "warmup_steps_untimed": warmup, "data": "HH-RLHF harmless train split, pairs needing no truncation",
        "variants": results,
    }


def markdown(report: dict, env: dict) -> str:
    lines = [
        "# ARM training throughput: ours (reference-free) vs TRL's reference-based DPO",
        "",
        f"Device: {env.get('gpu', 'CPU')}; torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"peft {env['peft']}. Model {Path(report['model']).name}, {report['mode']}, batch {report['batch_pairs']} pairs, "
        f"bf16 {report['bf16']}, {report['variants']['ours_reference_free']['timed_steps']} timed steps after "
        f"{report['warmup_steps_untimed']} warm-up steps; one run each.",
        "",
        "| trainer | reference log-probs | pairs/s | ms/step | peak GPU GiB | ours / this (speed-up) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["variants"].items():
        mem = "-" if row["peak_gpu_mem_gib"] is None else f"{row['peak_gpu_mem_gib']:.2f}"
        lines.append(f"| {name} | {row['reference']} | {row['pairs_per_s']:.3g} | {row['step_s'] * 1000:.0f} | "
                     f"{mem} | {row['speedup_of_ours']:.2f}x |")
    return "\n".join(lines) + "\n"


def throughput_only(args) -> int:
    """The trainer comparison alone, on any machine (e.g. the CPU one, at a smaller scale)."""
    from rm_training.config import TrainConfig

    out = Path(args.out or os.environ.get("OUT") or "artifacts").resolve()
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    env = environment()
    cfg = TrainConfig(model=args.model, data="builtin:hh-rlhf", dimension="harmless", out=str(WORK / "unused"),
                      mode="lora", batch_size=args.batch, per_device_batch_size=args.batch,
                      max_length=args.max_length, max_prompt_length=args.max_length // 2, progress=False)
    report = throughput(Path(args.model), cfg, False, (args.warmup, args.steps))
    report["environment"] = env
    report["command"] = "python bench/train_gpu.py " + " ".join(sys.argv[1:])
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, env)
    (out / "train_throughput.md").write_text(table)
    print(table)
    return 0


def run(args) -> int:
    started = time.perf_counter()
    env = environment()
    say("environment: " + json.dumps(env))
    out = Path(args.out or os.environ.get("OUT") or "artifacts").resolve()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    elif args.smoke and not args.parts:
        model = tiny_model()
    else:
        from genarm_common.model_fetch import convert_gguf, known_model

        gguf = join_parts([Path(p) for p in (args.parts or [STAGE])], WORK / "gguf")
        model = convert_gguf(gguf, WORK / "models" / MODEL_NAME,
                             source={"name": MODEL_NAME, "licence": known_model(MODEL_NAME).licence})
    say(f"model: {model} ({time.perf_counter() - started:.0f} s so far)")

    cfg, result = train_real_arm(model, args.smoke, out, args.epochs)
    say(f"ARM trained ({time.perf_counter() - started:.0f} s so far)")
    report = throughput(model, cfg, args.smoke)
    report["environment"] = env
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, env)
    (out / "train_throughput.md").write_text(table)

    m = result.metrics
    evals = [e for e in result.log_history if "eval_accuracy" in e]
    print("\n" + "=" * 78)
    print(f"real ARM: {Path(cfg.model).name}, harmless, {m['train_steps']} steps, "
          f"{result.data_report['split']['train_pairs']} train / {m.get('heldout_pairs')} held-out pairs")
    if evals:
        print(f"  held-out accuracy: {evals[0]['eval_accuracy']:.3f} at step 0 -> {m['heldout_accuracy']:.3f} "
              f"at the end; margin {evals[0]['eval_margin']:.2f} -> {m['heldout_margin']:.2f} nats")
    print(f"  final train loss {m['final_train_loss']:.4f}, held-out loss {m['heldout_loss']:.4f}, "
          f"{m['train_pairs_per_s']:.1f} pairs/s overall")
    print(table)
    print(f"files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("split", help="here: halve the verified GGUF into two carry folders")
    p.add_argument("gguf")
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p = sub.add_parser("stage", help="GPU call 1: park the first half in /tmp/genarm-stage")
    p.add_argument("dir_a")
    p = sub.add_parser("run", help="GPU call 2: join, convert, train the ARM, benchmark")
    p.add_argument("--parts", nargs="+", help=f"folders holding the GGUF halves (e.g. {STAGE} .gpu-b)")
    p.add_argument("--model", help="an HF folder instead of the GGUF halves")
    p.add_argument("--smoke", action="store_true",
                   help="dry run: a few steps on a few pairs (with a tiny random model unless --parts/--model)")
    p.add_argument("--out", help="output folder (default $OUT, else ./artifacts)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs over the train split (official: 1)")
    p = sub.add_parser("throughput", help="only the trainer comparison, on an HF folder (any machine)")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--out", help="output folder (default $OUT, else ./artifacts)")
    args = parser.parse_args(argv)
    if args.verb == "throughput":
        return throughput_only(args)
    if args.verb == "split":
        split_gguf(Path(args.gguf), Path(args.dir_a), Path(args.dir_b))
        return 0
    if args.verb == "stage":
        stage(Path(args.dir_a))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
