"""rm_training on CPU with the tiny model families: data adapters, the ARM loss, learning, resume, export."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rm_training.config import ConfigError, TrainConfig, build_config, load_yaml
from rm_training.preference_data import DataError, PairEncoder, adapt, prepare_data
from rm_training.scoring import arm_loss, score_pairs, sequence_logps
from genarm_common.model_checks import check_fusion_setup, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "rm_training" / "data" / "hh-rlhf" / "harmless-pairs-2000.jsonl.gz"
# Single tokens of the tiny tokenizer: a pair differs by one word, so the initial accuracy is near chance.
WORDS = ("about and any are but can could for from get have how just know like make might more need not other "
         "out people person really some someone that the their them there they think this try want way what with "
         "would you your").split()
MARKER = "help"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Learnable preference: the chosen response has the marker word where the rejected has another."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "?"
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
        k = rng.randrange(len(words))
        chosen = words[:k] + [MARKER] + words[k + 1:]
        rejected = words[:k] + [rng.choice(WORDS)] + words[k + 1:]
        records.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return records


def tiny_config(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model), data=str(data), out=str(out), dimension="harmless",
        learning_rate=2e-2, max_steps=24, batch_size=8, per_device_batch_size=8, heldout_fraction=0.2,
        eval_steps=6, logging_steps=1, save_steps=100, max_length=64, max_prompt_length=32, progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tokenizer(tiny_family):
    return AutoTokenizer.from_pretrained(tiny_family["llama-base"])


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("synthetic") / "pairs.jsonl", synthetic_pairs(400))


@pytest.fixture(scope="session")
def learned(tiny_family, synthetic_data, tmp_path_factory):
    """One LoRA run on the learnable synthetic preference, with --merge; shared by several tests."""
    from rm_training.pipeline import train_arm

    out = tmp_path_factory.mktemp("learned")
    cfg = tiny_config(tiny_family["llama-base"], synthetic_data, out, merge=True)
    return cfg, train_arm(cfg)


# ----------------------------------------------------------------------------- data adapters


def _encoded_text(tok, item):
    return tok.decode(item.prompt_ids), tok.decode(item.chosen_ids), tok.decode(item.rejected_ids)


def test_hh_dialogues_split_into_chat_turns(tokenizer) -> None:
    with gzip.open(HH, "rt") as f:
        record = json.loads(f.readline())
    fmt, pair = adapt(record, "auto", "safer")
    assert fmt == "hh"
    assert [m["role"] for m in pair.messages] == ["user", "assistant"] * 2 + ["user"]
    assert pair.messages[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert pair.chosen.startswith("No, sorry!") and pair.rejected.startswith("There are lots")

    chat = PairEncoder(tokenizer, max_length=1024, max_prompt_length=512).encode(pair)
    prompt, chosen, _ = _encoded_text(tokenizer, chat)
    assert prompt.endswith("<|im_start|>user\nokay some of these do not have anything to do with pens<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert chosen == pair.chosen + "<|im_end|>\n"

    plain = PairEncoder(tokenizer, 1024, 512, use_chat_template=False).encode(pair)
    prompt, chosen, rejected = _encoded_text(tokenizer, plain)
    assert prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert chosen == " " + pair.chosen + "</s>" and rejected.endswith("</s>")


def test_pku_gives_two_dimensions_and_uf_messages(tokenizer, tmp_path) -> None:
    pku = {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench and a pick.",
           "response_1": "I can't help with breaking into places.", "better_response_id": 0,
           "safer_response_id": 1}
    path = write_jsonl(tmp_path / "pku.jsonl", [pku])
    helpful = prepare_data(str(path), tokenizer, max_length=256, max_prompt_length=128, dimension="helpful",
                           heldout_fraction=0)
    harmless = prepare_data(str(path), tokenizer, max_length=256, max_prompt_length=128, dimension="harmless",
                            heldout_fraction=0)
    assert helpful.report["pku_label"] == "better" and harmless.report["pku_label"] == "safer"
    h, s = helpful.train[0], harmless.train[0]
    assert tokenizer.decode(h.chosen_ids).startswith("Use a tension") and tokenizer.decode(s.chosen_ids).startswith("I can't")
    assert h.chosen_ids == s.rejected_ids and h.rejected_ids == s.chosen_ids

    uf = {"prompt": "Say hi", "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
          "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}],
          "score_chosen": 8.0, "score_rejected": 3.0}
    fmt, pair = adapt(uf, "auto", "safer")
    assert fmt == "messages" and pair.messages == [{"role": "user", "content": "Say hi"}]
    assert (pair.chosen, pair.rejected) == ("Hi!", "No.")


def test_hh_form_prompts_and_hub_names(tokenizer, monkeypatch) -> None:
    import datasets

    fmt, pair = adapt({"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
                       "chosen": " Fine, thanks.", "rejected": " Go away."}, "auto", "safer")  # Dahoas/full-hh-rlhf
    assert fmt == "pairs" and [m["content"] for m in pair.messages] == ["hi", "hello", "how are you?"]
    assert (pair.chosen, pair.rejected) == ("Fine, thanks.", "Go away.")
    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [{"prompt": "Say hi", "chosen": [{"role": "user", "content": "Say hi"},
                                                {"role": "assistant", "content": "Hi!"}],
                 "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = prepare_data("HuggingFaceH4/ultrafeedback_binarized", tokenizer, max_length=64, max_prompt_length=32,
                        heldout_fraction=0)
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs")]
    assert data.report["formats"] == {"messages": 1}


def test_parquet_and_json_array_sources(tokenizer, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = synthetic_pairs(30, seed=3)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    a = prepare_data(str(tmp_path / "pairs.parquet"), tokenizer, max_length=64, max_prompt_length=32)
    b = prepare_data(str(tmp_path / "pairs.json"), tokenizer, max_length=64, max_prompt_length=32)
    assert a.report["kept"] == b.report["kept"] == 30
    assert [p.chosen_ids for p in a.train] == [p.chosen_ids for p in b.train]


def test_bad_records_are_counted_never_fatal(tokenizer, tmp_path) -> None:
    good = synthetic_pairs(20, seed=1)
    long_prompt = " ".join(["people"] * 200)
    bad = [
        {"prompt": "q", "chosen": "same answer", "rejected": "same answer"},          # identical_responses
        {"prompt": "q", "chosen": "an answer"},                                       # missing_field
        {"prompt": "q", "chosen": "   ", "rejected": "an answer"},                    # empty_response
        {"prompt": long_prompt, "chosen": "yes", "rejected": "no"},                   # prompt_too_long
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # prompt_mismatch
        {"prompt": "q", "response_0": "a", "response_1": "b", "safer_response_id": 7},  # bad_label
        {"prompt": "q", "chosen": long_prompt + " you", "rejected": long_prompt + " they"},  # identical once cut
        {"something": "else"},                                                        # unknown_format
    ]
    lines = [json.dumps(r) for r in good[:10] + bad + good[10:]]
    lines.insert(5, "{not json")                                                      # unparseable
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = prepare_data(str(path), tokenizer, max_length=40, max_prompt_length=24, heldout_fraction=0)
    assert data.report["skipped"] == {
        "identical_responses": 1, "missing_field": 1, "empty_response": 1, "prompt_too_long": 1,
        "prompt_mismatch": 1, "bad_label": 1, "identical_after_truncation": 1, "unknown_format": 1,
        "unparseable": 1,
    }
    assert data.report["kept"] == 20 and data.report["records"] == 29 and data.report["skipped_total"] == 9
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 40 for p in data.train)
    # Nothing usable: one clear error, no traceback from deep inside.
    with pytest.raises(DataError, match="no usable preference pairs"):
        prepare_data(str(write_jsonl(tmp_path / "bad.jsonl", bad)), tokenizer, max_length=40, max_prompt_length=24)


def test_long_dialogues_lose_oldest_turns(tokenizer) -> None:
    data = prepare_data(str(HH), tokenizer, max_length=256, max_prompt_length=128, max_records=60, heldout_fraction=0)
    assert data.report["prompts_shortened"] > 0 and data.report["skipped"].get("prompt_mismatch", 0) == 0
    assert all(len(p.prompt_ids) <= 128 and len(p.prompt_ids) + len(p.chosen_ids) <= 256 for p in data.train)
    for item in data.train:  # a shortened prompt still starts at a user turn of the chat template
        assert tokenizer.decode(item.prompt_ids).startswith("<|im_start|>user\n")


def test_split_is_by_prompt_and_deterministic(tokenizer, tmp_path) -> None:
    records = synthetic_pairs(300, seed=5)
    records += [dict(r, chosen=r["chosen"] + " more") for r in records[:100]]  # repeated prompts
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    kwargs = dict(max_length=64, max_prompt_length=32, heldout_fraction=0.25)
    a, b = prepare_data(str(path), tokenizer, **kwargs), prepare_data(str(path), tokenizer, **kwargs)
    assert [p.index for p in a.heldout] == [p.index for p in b.heldout]
    assert {p.key for p in a.train}.isdisjoint({p.key for p in a.heldout})
    assert 0.15 < len(a.heldout) / (len(a.train) + len(a.heldout)) < 0.35
    other = prepare_data(str(path), tokenizer, split_seed=1, **kwargs)
    assert [p.index for p in other.heldout] != [p.index for p in a.heldout]


# ----------------------------------------------------------------------------- the loss


def test_trainer_loss_is_the_arm_loss_by_hand(tiny_family, tokenizer, tmp_path) -> None:
    """TRL's value on a batch == -log sigmoid(beta_r * (sum logp_w - sum logp_l)), computed by hand.

    Also shows the test would catch a length-averaged or reference-based loss (the adapter is
    randomised so the policy differs from its reference, the base with the adapter disabled).
    """
    from rm_training.trainer import build_trainer

    cfg = tiny_config(tiny_family["llama-base"], HH, tmp_path, max_steps=1, batch_size=4, per_device_batch_size=4,
                      max_length=128, max_prompt_length=64).resolve()
    data = prepare_data(str(HH), tokenizer, max_length=128, max_prompt_length=64, max_records=24, heldout_fraction=0)
    trainer = build_trainer(cfg, data.train_dataset(), None, tokenizer, tmp_path / "checkpoints")
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    assert float(batch["ref_chosen_logps"].abs().sum() + batch["ref_rejected_logps"].abs().sum()) == 0.0
    assert batch["input_ids"].shape[1] % cfg.pad_to_multiple_of == 0  # the loss below ignores the padding
    model.eval()
    with torch.no_grad():
        trainer_loss = float(trainer.compute_loss(model, batch))
        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        # By hand: log_softmax of plain logits, gather each completion token, sum per response.
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
        token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        summed = (token_logps * completion[:, 1:]).sum(-1)
        chosen, rejected = summed.chunk(2)
        hand = float(-torch.nn.functional.logsigmoid(0.05 * (chosen - rejected)).mean())
        averaged = sequence_logps(model, ids, attention, completion, average=True).chunk(2)
        ours = float(arm_loss(*sequence_logps(model, ids, attention, completion).chunk(2), 0.05))
        with model.disable_adapter():
            ref_chosen, ref_rejected = sequence_logps(model, ids, attention, completion).chunk(2)
    assert trainer_loss == pytest.approx(hand, abs=1e-4)
    assert ours == pytest.approx(hand, abs=1e-4)  # rm_training.scoring agrees
    assert abs(hand - float(arm_loss(*averaged, 0.05))) > 0.05  # averaged log-probs: a different loss
    assert abs(hand - float(arm_loss(chosen - ref_chosen, rejected - ref_rejected, 0.05))) > 0.05  # with a reference


def test_batches_are_padded_to_a_multiple_of_64(tiny_family, tokenizer, tmp_path) -> None:
    """Few distinct batch shapes (each new length costs cuDNN attention a plan on the GPU)."""
    from rm_training.trainer import build_trainer

    cfg = tiny_config(tiny_family["llama-base"], HH, tmp_path, max_steps=1, batch_size=4, per_device_batch_size=4,
                      max_length=100, max_prompt_length=50).resolve()
    data = prepare_data(str(HH), tokenizer, max_length=100, max_prompt_length=50, max_records=24, heldout_fraction=0)
    trainer = build_trainer(cfg, data.train_dataset(), None, tokenizer, tmp_path / "checkpoints")
    for batch in list(trainer.get_train_dataloader())[:3]:
        longest = int(batch["attention_mask"].sum(-1).max())
        assert batch["input_ids"].shape[1] == -(-longest // 64) * 64, (longest, batch["input_ids"].shape)


def test_every_trainable_parameter_gets_a_gradient_so_ddp_skips_the_unused_search(tiny_family, tokenizer, tmp_path) -> None:
    """DDP is told that no parameter goes unused (no autograd-graph walk per step): true, as here."""
    from rm_training.trainer import build_trainer

    data = prepare_data(str(HH), tokenizer, max_length=100, max_prompt_length=50, max_records=24, heldout_fraction=0)
    for mode in ("lora", "full"):
        cfg = tiny_config(tiny_family["llama-base"], HH, tmp_path, max_steps=1, batch_size=4, per_device_batch_size=4,
                          max_length=100, max_prompt_length=50, mode=mode).resolve()
        trainer = build_trainer(cfg, data.train_dataset(), None, tokenizer, tmp_path / f"checkpoints-{mode}")
        assert trainer.args.ddp_find_unused_parameters is False
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(trainer.model, batch).backward()
        trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trainable and not [n for n, p in trainable if p.grad is None]


# ----------------------------------------------------------------------------- learning, export


def test_learns_a_synthetic_preference(learned, tiny_family, tokenizer) -> None:
    cfg, result = learned
    data = prepare_data(cfg.data, tokenizer, max_length=64, max_prompt_length=32, heldout_fraction=0.2)
    base = AutoModelForCausalLM.from_pretrained(tiny_family["llama-base"], dtype=torch.float32)
    before = score_pairs(base, data.heldout, tokenizer.eos_token_id)
    after = result.metrics
    assert before.accuracy < 0.65 and after["heldout_accuracy"] > 0.85, (before.accuracy, after)
    assert after["heldout_margin"] > before.margin + 2
    evals = [e for e in result.log_history if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 6, 12, 18, 24]
    assert evals[0]["eval_accuracy"] == pytest.approx(before.accuracy, abs=1e-6)  # step 0: the base (lora_B = 0)
    assert evals[-1]["eval_accuracy"] == pytest.approx(after["heldout_accuracy"], abs=1e-6)  # pair-weighted
    assert evals[-1]["eval_margin"] == pytest.approx(after["heldout_margin"], rel=1e-3)
    png = result.out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_export_loads_back_and_the_server_accepts_it(learned, tiny_family, tokenizer) -> None:
    from peft import PeftModel

    cfg, result = learned
    adapter, merged = result.adapter_dir, result.merged_dir
    assert (adapter / "adapter_model.safetensors").stat().st_size < 200_000  # an adapter, not a model
    info = json.loads((adapter / "genarm_arm.json").read_text())
    assert info["kind"] == "lora_adapter" and info["dimension"] == "harmless" and info["mode"] == "lora"
    assert info["beta_r"] == 0.05 and info["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert info["tokenizer_sha256"] == tokenizer_fingerprint(tokenizer)
    assert info["base_model"] == str(Path(tiny_family["llama-base"]).resolve())
    assert info["data"]["split"]["heldout_pairs"] == info["metrics"]["heldout_pairs"] > 0
    assert info["metrics"]["heldout_accuracy"] == result.metrics["heldout_accuracy"]
    assert "command" in info and "created_at" in info
    assert json.loads((merged / "genarm_arm.json").read_text())["kind"] == "merged"

    data = prepare_data(cfg.data, tokenizer, max_length=64, max_prompt_length=32, heldout_fraction=0.2)
    base = AutoModelForCausalLM.from_pretrained(tiny_family["llama-base"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    a = score_pairs(with_adapter, data.heldout, tokenizer.eos_token_id)
    b = score_pairs(plain, data.heldout, tokenizer.eos_token_id)
    assert a.accuracy == pytest.approx(result.metrics["heldout_accuracy"])
    torch.testing.assert_close(torch.tensor(a.chosen), torch.tensor(b.chosen), atol=1e-3, rtol=1e-4)
    setup = check_fusion_setup(tiny_family["llama-base"], {"harmless": merged})
    assert setup.tokenizer_sha256 == info["tokenizer_sha256"]


def tiny_cli_command(model: Path, data: Path, out: Path, **flags: object) -> list[str]:
    """genarm-train as a user runs it, on the tiny model with small batches and lengths; `flags`
    (learning_rate=..., max_steps=...) become --learning-rate ..., --max-steps ...."""
    cmd = [sys.executable, "-m", "rm_training.cli", "--model", str(model), "--data", str(data), "--out", str(out),
           "--batch-size", "8", "--per-device-batch-size", "8", "--heldout-fraction", "0.2", "--logging-steps", "1",
           "--max-length", "64", "--max-prompt-length", "32", "--no-progress"]
    for name, value in flags.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_family, synthetic_data, tmp_path) -> None:
    """SIGKILL after step 7 (checkpoints every 3 steps), resume from checkpoint-6: same weights and losses."""
    from rm_training.pipeline import train_arm

    common = dict(max_steps=10, save_steps=3, eval_steps=5)
    full = train_arm(tiny_config(tiny_family["llama-base"], synthetic_data, tmp_path / "a", **common))
    out = tmp_path / "b"
    cmd = tiny_cli_command(tiny_family["llama-base"], synthetic_data, out, learning_rate="2e-2", max_steps=10,
                           eval_steps=5, save_steps=3)
    env = dict(os.environ, GENARM_TRAIN_KILL_AT_STEP="7")
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    steps = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert steps == ["checkpoint-3", "checkpoint-6"] and not (out / "adapter").exists()

    with pytest.raises(ConfigError, match="--resume"):
        train_arm(tiny_config(tiny_family["llama-base"], synthetic_data, out, **common))
    resumed = train_arm(tiny_config(tiny_family["llama-base"], synthetic_data, out, resume=True, **common))
    assert resumed.resumed_from.endswith("checkpoint-6")

    losses = lambda r: [(e["step"], e["loss"]) for e in r.log_history if "loss" in e]  # noqa: E731
    assert [s for s, _ in losses(resumed)] == list(range(1, 11))
    for (s1, l1), (s2, l2) in zip(losses(full), losses(resumed), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    w_full = load_file(full.adapter_dir / "adapter_model.safetensors")
    w_resumed = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert w_full.keys() == w_resumed.keys()
    for key in w_full:
        torch.testing.assert_close(w_resumed[key], w_full[key], atol=1e-5, rtol=1e-4)
    assert resumed.metrics["heldout_accuracy"] == pytest.approx(full.metrics["heldout_accuracy"])


def test_full_fine_tune_writes_a_plain_folder(tiny_family, synthetic_data, tmp_path) -> None:
    from rm_training.pipeline import train_arm

    result = train_arm(tiny_config(tiny_family["qwen2-arm"], synthetic_data, tmp_path, mode="full",
                                   learning_rate=1e-3, max_steps=3, eval_steps=3, plot=False,
                                   gradient_checkpointing=True))
    assert result.adapter_dir is None and (result.merged_dir / "model.safetensors").is_file()
    info = json.loads((result.merged_dir / "genarm_arm.json").read_text())
    assert info["mode"] == "full" and info["beta_r"] == 0.1 and "lora" not in info
    before = AutoModelForCausalLM.from_pretrained(tiny_family["qwen2-arm"], dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert any("q_proj" in n for n in changed) and any("mlp" in n for n in changed)  # all weights train


# ----------------------------------------------------------------------------- configuration, CLI


def test_yaml_config_and_flags(tmp_path) -> None:
    from rm_training.cli import parse_config

    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\ndimension: helpful\nlearning-rate: 1.0e-4\nmerge: true\n"
                    "lora_target_modules: [q_proj, v_proj]\n")
    cfg = parse_config(["--config", str(path), "--learning-rate", "3e-4", "--no-merge", "--out", "o"])
    assert (cfg.model, cfg.dimension, cfg.learning_rate, cfg.merge, cfg.out) == ("m", "helpful", 3e-4, False, "o")
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    resolved = cfg.resolve()
    assert (resolved.beta_r, resolved.epochs, resolved.max_length, resolved.max_prompt_length) == (0.05, 1.0, 1024, 512)
    full = build_config({}, {"model": "m", "data": "d", "mode": "full"}).resolve()
    assert (full.beta_r, full.learning_rate, full.epochs) == (0.1, 5e-7, 3.0)
    path.write_text("model: m\nlearnig_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="multiple of per_device_batch_size"):
        build_config({}, {"model": "m", "data": "d", "batch_size": 10, "per_device_batch_size": 4}).resolve()
    with pytest.raises(ConfigError, match="mode"):
        build_config({}, {"model": "m", "data": "d", "mode": "lorra"}).resolve()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
            build_config({}, {"model": "m", "data": "d", "mode": "qlora"}).resolve()
    for name in ("accelerate_ddp.yaml", "accelerate_fsdp.yaml", "deepspeed_zero3.yaml", "hh_harmless_lora.yaml"):
        assert (ROOT / "rm_training" / "configs" / name).is_file(), name
    shipped = load_yaml(ROOT / "rm_training" / "configs" / "hh_harmless_lora.yaml")
    assert build_config(shipped, {"model": "m"}).resolve().dimension == "harmless"


def test_cli_errors_are_one_line(tiny_family, foreign_arm, tmp_path, capsys) -> None:
    from rm_training.cli import main

    assert main(["--model", str(tiny_family["llama-base"]), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(10))
    assert main(["--model", str(foreign_arm), "--base-model", str(tiny_family["llama-base"]),
                 "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "does not share the tokenizer" in capsys.readouterr().err


def test_a_diverged_run_stops_with_one_line_and_saves_no_arm(tiny_family, synthetic_data, tmp_path) -> None:
    """A learning rate of 1e8 blows the loss up within a few steps: genarm-train must say so and
    exit non-zero, not train on and save an ARM that scores nothing."""
    out = tmp_path / "diverged"
    cmd = tiny_cli_command(tiny_family["llama-base"], synthetic_data, out, learning_rate="1e8", max_steps=30,
                           eval_steps=100, save_steps=100)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("genarm-train: error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "Traceback" not in done.stderr
    assert not (out / "adapter").exists()


def test_known_model_names(tiny_family, tmp_path, monkeypatch) -> None:
    from rm_training import pipeline
    from genarm_common import model_fetch

    monkeypatch.setattr(model_fetch, "fetch_model", lambda name, *a, **k: tiny_family["llama-base"])
    assert pipeline.resolve_model("SmolLM2-135M-Instruct") == str(tiny_family["llama-base"])
    assert pipeline.resolve_model("org/some-hub-model") == "org/some-hub-model"
    (tmp_path / "genarm_source.json").write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    assert pipeline.known_model_name(str(tmp_path)) == "smollm2-135m-instruct"
    assert pipeline.known_model_name(str(tiny_family["llama-base"])) is None


def test_incomplete_checkpoints_are_set_aside(tmp_path) -> None:
    from rm_training.trainer import newest_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert (tmp_path / "incomplete-checkpoint-6").is_dir() and not (tmp_path / "checkpoint-6").exists()
