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
    python3 bench/train_gpu.py run --parts /tmp/genarm-stage .gpu-b --out $OUT [--profile]

Writes under --out (default $OUT, else ./artifacts), at most 8 files:
    train_arm_adapter.tar.gz  train_curves.png  train_genarm_arm.json  train_log_history.json
    train_throughput.json  train_throughput.md  [train_profile.txt]

DDP scaling of the user's command (accelerate launch ... -m rm_training.cli) on 1 and 2 GPUs:
    python3 bench/train_gpu.py ddp --model HF_FOLDER --train-data T.jsonl --heldout-data H.jsonl --gpus 1 2 --out $OUT
    python bench/train_gpu.py ddp --smoke --gpus 1 --out /tmp/ddp     # CPU dry run, tiny model
writes train_ddp.json, train_ddp.md and train_ddp_<N>.log under --out (the runs themselves under --runs-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
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


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_callback(on_begin, on_end):
    """A TrainerCallback calling on_begin(state) / on_end(state) around each optimizer step."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            on_begin(state)

        def on_step_end(self, args, state, control, **kwargs):
            on_end(state)

    return _Callback()


class StepTimer:
    """Wall-clock time of optimizer steps warmup+1 .. last (GPU synchronised); all steps if last is None."""

    def __init__(self, warmup: int, last: int | None = None) -> None:
        self.warmup, self.last = warmup, last
        self.times: list[float] = []
        self._start = 0.0
        self.callback = _step_callback(self._begin, self._end)

    def _begin(self, state) -> None:
        _sync()
        self._start = time.perf_counter()

    def _end(self, state) -> None:
        _sync()
        if state.global_step > self.warmup and (self.last is None or state.global_step <= self.last):
            self.times.append(time.perf_counter() - self._start)


class StepProfiler:
    """torch.profiler around optimizer step `step` (1-based) only; CUDA synchronised at both ends.

    A failure of the profiler (no CUPTI, say) is kept as text rather than ending the benchmark.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.table = ""
        self.wall_s: float | None = None
        self.error: str | None = None
        self._profiler = None
        self._start = 0.0
        self.callback = _step_callback(self._begin, self._end)

    def _begin(self, state) -> None:
        if state.global_step + 1 != self.step:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        try:
            _sync()
            self._profiler = profile(activities=activities)
            self._profiler.start()
        except Exception as err:  # noqa: BLE001 - keep benchmarking without the profile
            self.error, self._profiler = f"profiler did not start: {err!r}", None
        self._start = time.perf_counter()

    def _end(self, state) -> None:
        if state.global_step != self.step or self._profiler is None:
            return
        import torch

        _sync()
        self.wall_s = time.perf_counter() - self._start
        try:
            self._profiler.stop()
            sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.table = self._profiler.key_averages().table(sort_by=sort_by, row_limit=30)
        except Exception as err:  # noqa: BLE001
            self.error = f"profiler did not finish: {err!r}"
        self._profiler = None

    def text(self, name: str) -> str:
        wall = "-" if self.wall_s is None else f"{self.wall_s * 1000:.1f} ms"
        head = f"== {name}: optimizer step {self.step}, wall time {wall} (profiler on)"
        return "\n".join([head, *([self.error] if self.error else []), self.table or "(no table)", ""])


OURS = "ours_reference_free"
REFERENCE = {
    OURS: "none (reference-free ARM loss)",
    "trl_dpo_lora_ref_frozen_copy": "separate frozen copy of the model",
    "trl_dpo_lora_ref_adapter_off": "policy with the LoRA adapter disabled (TRL default)",
}
# Ours first and last: the spread of the two ours runs shows how much run order matters.
ORDER = (OURS, "trl_dpo_lora_ref_frozen_copy", "trl_dpo_lora_ref_adapter_off", f"{OURS}_repeat")
PROFILED = (OURS, "trl_dpo_lora_ref_frozen_copy")
PROFILE_FILE = "train_profile.txt"  # both profiles in one file: the run verb may bring back 8 files at most
PROFILE_HELP = f"also profile one extra step of {' and '.join(PROFILED)} (torch.profiler) into {PROFILE_FILE}"


@dataclasses.dataclass
class _Bench:
    """What every variant trains on: the model, the resolved config, the same pairs in both forms."""

    model: Path
    cfg: object
    tokenizer: object
    ours_ds: object
    trl_ds: object


def _variant_trainer(name: str, bench: _Bench, scratch: Path, callbacks: list):
    """The trainer of one variant (name without a _repeat suffix); TRL's data checked to be ours."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from rm_training.trainer import build_trainer, dpo_config, lora_config

    cfg, ours_ds, trl_ds = bench.cfg, bench.ours_ds, bench.trl_ds
    if name == OURS:
        return build_trainer(cfg, ours_ds, None, bench.tokenizer, scratch, callbacks=callbacks)
    args = dataclasses.replace(dpo_config(cfg, scratch, len(trl_ds), False, 1), precompute_ref_log_probs=False)
    ref = None
    if name.endswith("frozen_copy"):
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        ref = AutoModelForCausalLM.from_pretrained(str(bench.model), dtype=dtype)
    trainer = DPOTrainer(model=cfg.model, ref_model=ref, args=args, train_dataset=trl_ds,
                         processing_class=bench.tokenizer, peft_config=lora_config(cfg), callbacks=callbacks)
    same = [trainer.train_dataset[i]["chosen_ids"] == ours_ds[i]["chosen_ids"]
            and trainer.train_dataset[i]["prompt_ids"] == ours_ds[i]["prompt_ids"] for i in range(8)]
    if not all(same):
        raise RuntimeError(f"{name}: TRL's tokenization differs from ours: not the same data")
    return trainer


def _train_variant(name: str, bench: _Bench, callbacks: list) -> tuple[float, float | None]:
    """Train one variant to the end in a scratch folder: (wall seconds, peak GPU GiB or None)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=WORK))
    try:
        # Built in here, so that the trainer (and a frozen reference) are freed before the next variant.
        trainer = _variant_trainer(name.removesuffix("_repeat"), bench, scratch, callbacks)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        del trainer
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    gc.collect()
    return wall, peak


def throughput(model: Path, base_cfg, smoke: bool, warmup_and_steps: tuple[int, int] | None = None,
               profile_to: Path | None = None) -> dict:
    """Ours vs TRL's DPO with a reference, same data and settings; `profile_to`: also write one profiled
    step of ours and of the frozen copy to that file (an extra step after the timed ones, so untimed)."""
    from rm_training.trainer import dpo_config

    warmup, steps = warmup_and_steps or ((1, 2) if smoke else (5, 30))
    extra = 1 if profile_to else 0
    cfg = dataclasses.replace(base_cfg, max_steps=warmup + steps + extra, save_steps=10**6, eval_steps=None,
                              logging_steps=10**6, progress=False).resolve()
    batch = cfg.batch_size
    tokenizer, ours_ds, trl_ds = _benchmark_data(model, cfg, limit=batch * (warmup + steps + extra))
    bench = _Bench(model, cfg, tokenizer, ours_ds, trl_ds)
    say(f"throughput: {len(ours_ds)} pairs, {warmup} warm-up + {steps} timed steps of {batch} pairs each"
        + (", then 1 profiled step" if extra else ""))

    # Untimed warm-up of the whole process (kernel JIT / autotune, cuBLAS heuristics, allocator growth),
    # so that none of it lands on whichever variant happens to run first.
    prewarm_steps = max(2, warmup)
    timer = StepTimer(0)
    short = dataclasses.replace(bench, cfg=dataclasses.replace(cfg, max_steps=prewarm_steps))
    wall, peak = _train_variant(OURS, short, [timer.callback])
    prewarm = {"variant": OURS, "steps": prewarm_steps, "wall_s": wall, "step_s": timer.times,
               "peak_gpu_mem_gib": peak}
    say(f"process warm-up: {prewarm_steps} steps of {OURS}, " + ", ".join(f"{t * 1000:.0f}" for t in timer.times)
        + " ms/step")

    results, profiles = {}, []
    for name in ORDER:
        timer = StepTimer(warmup, warmup + steps)
        callbacks = [timer.callback]
        profiler = None
        if profile_to and name in PROFILED:
            profiler = StepProfiler(warmup + steps + 1)
            callbacks.append(profiler.callback)
        wall, peak = _train_variant(name, bench, callbacks)
        step_s = sum(timer.times) / len(timer.times)
        results[name] = {
            "pairs_per_s": batch / step_s,
            "step_s": step_s,
            "step_s_min": min(timer.times),
            "step_s_max": max(timer.times),
            "timed_steps": len(timer.times),
            "run_index": len(results),
            "wall_s_incl_warmup": wall,
            "peak_gpu_mem_gib": peak,
            "reference": REFERENCE[name.removesuffix("_repeat")],
        }
        if profiler is not None:
            results[name]["profiled_step_wall_s"] = profiler.wall_s
            profiles.append(profiler.text(name))
        say(f"{name}: {results[name]['pairs_per_s']:.1f} pairs/s ({step_s * 1000:.0f} ms/step)")
    ours_runs = [results[OURS]["pairs_per_s"], results[f"{OURS}_repeat"]["pairs_per_s"]]
    ours = sum(ours_runs) / 2
    for row in results.values():
        row["speedup_of_ours"] = ours / row["pairs_per_s"]  # the mean of both ours runs / this
    if profile_to:
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        profile_to.write_text(f"torch.profiler, one optimizer step of {batch} pairs after {warmup + steps} "
                              f"steps; model {model}\n\n" + "\n".join(profiles))
    return {
        "model": str(model), "mode": f"lora (r={cfg.lora_r}, {','.join(cfg.lora_target_modules)})",
        "batch_pairs": batch, "max_length": cfg.max_length,
        "bf16": bool(dpo_config(cfg, WORK, 1, False, 1).bf16), "gradient_checkpointing": cfg.gradient_checkpointing,
        "warmup_steps_untimed": warmup, "data": "HH-RLHF harmless train split, pairs needing no truncation",
        "process_warmup": prewarm, "order": list(ORDER),
        "ours_pairs_per_s_mean": ours, "ours_repeat_over_first": ours_runs[1] / ours_runs[0],
        "profile_file": profile_to.name if profile_to else None,
        "variants": results,
    }


def markdown(report: dict, env: dict) -> str:
    prewarm = report.get("process_warmup")
    lines = [
        "# ARM training throughput: ours (reference-free) vs TRL's reference-based DPO",
        "",
        f"Device: {env.get('gpu', 'CPU')}; torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"peft {env['peft']}. Model {Path(report['model']).name}, {report['mode']}, batch {report['batch_pairs']} pairs, "
        f"bf16 {report['bf16']}, {report['variants'][OURS]['timed_steps']} timed steps after "
        f"{report['warmup_steps_untimed']} warm-up steps per run; runs in the order of the table, one process"
        + (f", after an untimed process warm-up ({prewarm['steps']} steps of ours)" if prewarm else "") + ".",
        "",
        "| # | trainer | reference log-probs | pairs/s | ms/step (min-max) | peak GPU GiB | ours / this (speed-up) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["variants"].items():
        mem = "-" if row["peak_gpu_mem_gib"] is None else f"{row['peak_gpu_mem_gib']:.2f}"
        spread = (f" ({row['step_s_min'] * 1000:.0f}-{row['step_s_max'] * 1000:.0f})" if "step_s_min" in row else "")
        lines.append(f"| {row.get('run_index', '-')} | {name} | {row['reference']} | {row['pairs_per_s']:.3g} | "
                     f"{row['step_s'] * 1000:.0f}{spread} | {mem} | {row['speedup_of_ours']:.2f}x |")
    if "ours_pairs_per_s_mean" in report:
        lines += ["", f"Speed-ups use the mean of the two ours runs, {report['ours_pairs_per_s_mean']:.3g} pairs/s; "
                      f"second ours run / first: {report['ours_repeat_over_first']:.3f}."]
    if prewarm:
        lines.append(f"Process warm-up step times (ms): {', '.join(f'{t * 1000:.0f}' for t in prewarm['step_s'])}.")
    if report.get("profile_file"):
        lines.append(f"One extra (untimed) step of {', '.join(PROFILED)} profiled: {report['profile_file']}.")
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
    report = throughput(Path(args.model), cfg, False, (args.warmup, args.steps),
                        profile_to=out / PROFILE_FILE if args.profile else None)
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
    report = throughput(model, cfg, args.smoke, profile_to=out / PROFILE_FILE if args.profile else None)
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


# ----------------------------------------------------------------------------- DDP scaling

DDP_CONFIG = ROOT / "rm_training" / "configs" / "accelerate_ddp.yaml"
# NVLink multicast stays off on the lent machines (NCCL NVLS, torch symmetric memory, NVSHMEM).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LORA_FLAGS = ["--mode", "lora", "--lora-r", "16", "--lora-alpha", "32",
              "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
SUMMARY_BANNER = " GenARM ARM training: summary"  # printed by the main process only (rm_training.pipeline)
# --smoke on CPU: a tiny model, a few dozen pairs, two optimizer steps.
DDP_SMOKE = {"per_device_batch": 2, "batch": 4, "max_length": 128, "max_prompt_length": 64, "max_steps": 2}
DDP_DEFAULTS = {"per_device_batch": 16, "batch": 32, "max_length": 232, "max_prompt_length": 128, "max_steps": None}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(args, n: int, run_dir: Path, cpu: bool) -> list[str]:
    """What a user runs: accelerate launch (also for N=1, so every N takes the same path) of rm_training.cli."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
              "--num_processes", str(n), "--main_process_port", str(_free_port())]
    if cpu:  # the config asks for bf16, which a CPU smoke neither needs nor checks
        launch += ["--mixed_precision", "no"]
    train = ["-m", "rm_training.cli", "--model", str(Path(args.model).resolve()),
             "--data", str(Path(args.train_data).resolve()), "--heldout-data", str(Path(args.heldout_data).resolve()),
             "--dimension", "positive", *LORA_FLAGS, "--epochs", f"{args.epochs:g}",
             "--batch-size", str(args.batch), "--per-device-batch-size", str(args.per_device_batch),
             "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length)]
    if args.max_steps:
        train += ["--max-steps", str(args.max_steps)]
    return launch + train + ["--no-merge", "--no-progress", "--out", str(run_dir)]


def _ddp_row(n: int, run_dir: Path, log_text: str) -> dict:
    """The run's own numbers, from what rm_training.pipeline wrote (adapter/genarm_arm.json, log_history.json)."""
    info = json.loads((run_dir / "adapter" / "genarm_arm.json").read_text())
    metrics = info["metrics"]
    history = json.loads((run_dir / "log_history.json").read_text())
    end = next(i for i, e in enumerate(history) if "train_runtime" in e)
    # train_runtime includes the evaluations during training (eval_on_start and every eval_steps): also without.
    eval_s = sum(e.get("eval_runtime", 0.0) for e in history[:end])
    train_s = metrics["train_runtime_s"]
    pairs = metrics["train_pairs_per_s"] * train_s
    row = {
        "pairs_per_s": metrics["train_pairs_per_s"],
        "pairs_per_s_excl_eval": pairs / (train_s - eval_s) if train_s > eval_s else None,
        "train_s": train_s, "eval_s_during_training": eval_s, "train_steps": metrics["train_steps"],
        "train_pairs": info["data"]["split"]["train_pairs"],
        "heldout_accuracy": metrics.get("heldout_accuracy"), "heldout_pairs": metrics.get("heldout_pairs"),
        "heldout_margin": metrics.get("heldout_margin"), "heldout_metric_source": metrics.get("heldout_metric_source"),
        "final_train_loss": metrics.get("final_train_loss"),
    }
    # One summary per run, printed by rank 0 only: N summaries mean N single-process runs, not DDP.
    summaries = log_text.count(SUMMARY_BANNER)
    row["ddp_check"] = "ok" if summaries == 1 else f"FAILED: {summaries} processes each ran alone"
    return row


def ddp_markdown(report: dict) -> str:
    rows = report["runs"]
    base = next((r["pairs_per_s"] for r in rows if r["gpus"] == 1 and r.get("pairs_per_s")), None)
    lines = [
        "# ARM training, data parallel (DDP) scaling",
        "",
        f"Device: {report['device']}; {report['model']}, train {report['train_data']}, held-out "
        f"{report['heldout_data']}. pairs/s: rm_training's train_samples_per_second (incl. the evaluations during "
        "training); excl. eval: with their eval_runtime taken out.",
        "",
        "| GPUs | pairs/s | speed-up vs 1 | pairs/s excl. eval | steps | held-out accuracy | held-out pairs | "
        "train s | wall s | check |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['gpus']} | - | - | - | - | - | - | - | {fmt(r.get('wall_s'), '.0f')} | "
                         f"{r.get('error') or r['skipped']} |")
            continue
        speedup = r["pairs_per_s"] / base if base else None
        lines.append(
            f"| {r['gpus']} | {r['pairs_per_s']:.1f} | {fmt(speedup, '.2f')}x | "
            f"{fmt(r['pairs_per_s_excl_eval'], '.1f')} | "
            f"{r['train_steps']} | {fmt(r['heldout_accuracy'], '.4f')} | {r['heldout_pairs']} | {r['train_s']:.1f} | "
            f"{r['wall_s']:.0f} | {r['ddp_check']} |")
    lines += ["", "Held-out accuracy: N=1 scores every held-out pair exactly (rm_training.scoring); N>1 uses the "
              "trainer's evaluation on all ranks.", "", "Commands (environment: "
              + " ".join(f"{k}={v}" for k, v in report["environment_vars"].items()) + ", CUDA_VISIBLE_DEVICES=0..N-1):"]
    lines += [f"    {r['command']}" for r in rows if "skipped" not in r]
    return "\n".join(lines) + "\n"


def _smoke_pairs(folder: Path, train: str | None, heldout: str | None) -> tuple[Path, Path]:
    """A few dozen pairs: the first lines of the given files, else of the bundled HH-RLHF pairs."""
    import gzip

    def head(source: Path, skip: int, count: int, dest: Path) -> Path:
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(skip + count), f)][skip:]
        dest.write_text("".join(lines))
        return dest

    folder.mkdir(parents=True, exist_ok=True)
    bundled = ROOT / "rm_training" / "data" / "hh-rlhf" / "harmless-pairs-2000.jsonl.gz"
    return (head(Path(train) if train else bundled, 0, 32, folder / "train.jsonl"),
            head(Path(heldout) if heldout else bundled, 0 if heldout else 32, 12, folder / "heldout.jsonl"))


def ddp(args) -> int:
    import torch

    out = Path(args.out or os.environ.get("OUT") or "artifacts").resolve()
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    preset = DDP_SMOKE if args.smoke else DDP_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.model = args.model or str(tiny_model())
        args.train_data, args.heldout_data = _smoke_pairs(WORK / "ddp-smoke-data", args.train_data,
                                                          args.heldout_data)
    elif not (args.model and args.train_data and args.heldout_data):
        raise SystemExit("ddp: --model, --train-data and --heldout-data are needed (or --smoke)")
    runs_dir = Path(args.runs_dir).resolve() if args.runs_dir else WORK / "ddp"
    gpus_here = torch.cuda.device_count() if cuda else 0
    env = environment()
    report = {
        "device": f"{gpus_here} x {env['gpu']}" if cuda else "CPU (accelerate on CPU: one process only)",
        "model": str(args.model), "train_data": str(args.train_data), "heldout_data": str(args.heldout_data),
        "settings": {k: getattr(args, k) for k in ("epochs", *DDP_DEFAULTS)},
        "environment_vars": NO_MULTICAST, "environment": env, "runs": [],
    }
    for n in args.gpus:
        run_dir = runs_dir / f"ddp-{n}"
        cmd = ddp_command(args, n, run_dir, cpu=not cuda)
        row: dict = {"gpus": n, "command": " ".join(cmd), "out": str(run_dir)}
        report["runs"].append(row)
        if not cuda and n > 1:
            # rm_training.pipeline's PartialState() has no CPU multi-process mode: N>1 on CPU would run N
            # independent single-process trainings into one folder.
            row["skipped"] = "skipped: no multi-process CPU mode in rm_training.pipeline"
        elif cuda and n > gpus_here:
            row["skipped"] = f"skipped: {gpus_here} GPUs here"
        if "skipped" in row:
            say(f"ddp N={n}: {row['skipped']}")
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        run_env = dict(os.environ, **NO_MULTICAST, CUDA_VISIBLE_DEVICES=",".join(map(str, range(n))),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        log = out / f"train_ddp_{n}.log"
        say(f"ddp N={n}: {row['command']}  (log {log})")
        started = time.perf_counter()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: our own process group
                rc = proc.wait()
                row["error"] = f"timed out after {args.timeout_s} s"
        row["wall_s"] = time.perf_counter() - started
        row["rc"] = rc
        text = log.read_text(errors="replace")
        if rc == 0:
            try:
                row.update(_ddp_row(n, run_dir, text))
            except (OSError, ValueError, KeyError, StopIteration) as err:
                row["error"] = f"outputs unreadable: {err!r}"
        else:
            row.setdefault("error", f"exit status {rc}")
            print(text[-3000:], flush=True)
        say(f"ddp N={n}: " + (row.get("error") or f"{row['pairs_per_s']:.1f} pairs/s, held-out accuracy "
                                                  f"{row['heldout_accuracy']}, {row['wall_s']:.0f} s"))
        # Written after every run, so that a run cut short by a time limit still leaves the earlier ones.
        (out / "train_ddp.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "train_ddp.md").write_text(ddp_markdown(report))
    (out / "train_ddp.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = ddp_markdown(report)
    (out / "train_ddp.md").write_text(table)
    print(table, flush=True)
    return 0 if all("error" not in r for r in report["runs"]) else 1


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
    p.add_argument("--profile", action="store_true", help=PROFILE_HELP)
    p = sub.add_parser("throughput", help="only the trainer comparison, on an HF folder (any machine)")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--profile", action="store_true", help=PROFILE_HELP)
    p.add_argument("--out", help="output folder (default $OUT, else ./artifacts)")
    p = sub.add_parser("ddp", help="DDP scaling: rm_training.cli under accelerate launch on 1, 2, ... GPUs")
    p.add_argument("--model", help="HF folder (--smoke: a tiny random model unless given)")
    p.add_argument("--train-data", help="train pairs (.jsonl); --smoke: the first 32 lines (default: bundled HH)")
    p.add_argument("--heldout-data", help="held-out pairs (.jsonl); --smoke: the first 12 lines")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process / GPU counts to run (default 1 2)")
    p.add_argument("--out", help="output folder for train_ddp.{json,md} and the launch logs (default $OUT)")
    p.add_argument("--runs-dir", help=f"where the runs write adapters and checkpoints, <dir>/ddp-N "
                                      f"(default {WORK / 'ddp'}; kept out of --out, which travels back)")
    p.add_argument("--epochs", type=float, default=1.0)
    for key, value in DDP_DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"default {value or 'none (epochs)'} ({DDP_SMOKE[key]} with --smoke)")
    p.add_argument("--timeout-s", type=float, default=1800, help="kill a run after this long (default 1800)")
    p.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, a few dozen pairs, 2 steps")
    args = parser.parse_args(argv)
    if args.verb == "ddp":
        return ddp(args)
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
