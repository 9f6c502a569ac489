"""Tiny model families built offline: one tokenizer, several models of other shapes sharing it.

The tokenizer is a byte-level BPE trained with `tokenizers` on real text bundled with the
project (the HH-RLHF pairs under rm_training/data); the models are Llama and Qwen2
architectures with random weights, saved as Hugging Face folders with safetensors. Head sizes
are ones vLLM's CPU attention accepts (32, 64, ...). Deterministic: same seed, same files.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ROOT = Path(__file__).resolve().parents[1]
HH_PAIRS = ROOT / "rm_training" / "data" / "hh-rlhf" / "harmless-pairs-2000.jsonl.gz"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Big enough init that random logits are peaked (few near-ties), small enough to stay finite.
INIT_RANGE = 0.2


def corpus_lines(records: int = 400, skip: int = 0) -> list[str]:
    lines: list[str] = []
    with gzip.open(HH_PAIRS, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if i >= skip + records:
                break
            pair = json.loads(line)
            lines.extend([pair["chosen"], pair["rejected"]])
    return lines


def train_tokenizer(out_dir: Path, vocab_size: int = 512, records: int = 400, skip: int = 0) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_lines(records, skip), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _config(cls: type[PreTrainedConfig], vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
            **extra: int) -> PreTrainedConfig:
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
        **extra,
    )


def _llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> LlamaConfig:
    return _config(LlamaConfig, vocab, hidden, layers, heads, kv_heads, head_dim=head_dim)


def _qwen2(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> Qwen2Config:
    return _config(Qwen2Config, vocab, hidden, layers, heads, kv_heads)


def family_configs(vocab: int) -> dict[str, PreTrainedConfig]:
    """name -> config. Head sizes and counts differ between members on purpose."""
    padded = (vocab + 63) // 64 * 64 + 64  # like Qwen2.5: the table is wider than the tokenizer
    return {
        # Llama family: base + two ARMs of other widths / depths / head geometry.
        "llama-base": _llama(vocab, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32),
        "llama-arm-narrow": _llama(vocab, hidden=64, layers=3, heads=2, kv_heads=1, head_dim=32),
        "llama-arm-padded": _llama(padded, hidden=128, layers=1, heads=2, kv_heads=1, head_dim=64),
        # Same geometry as the base (other weights): sub-models must not share compiled code.
        "llama-arm-same": _llama(vocab, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32),
        # Qwen2 pair (q/k/v biases), head_dim 64 and 32.
        "qwen2-base": _qwen2(padded, hidden=128, layers=2, heads=2, kv_heads=1),
        "qwen2-arm": _qwen2(vocab, hidden=64, layers=2, heads=2, kv_heads=2),
    }


def save_random_model(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerFast, out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_family(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Build every member under out_dir/<name>; returns name -> folder."""
    tokenizer = train_tokenizer(out_dir / "tokenizer")
    paths: dict[str, Path] = {}
    for i, (name, config) in enumerate(family_configs(len(tokenizer)).items()):
        paths[name] = save_random_model(config, tokenizer, out_dir / name, seed=seed + i)
    return paths


def build_foreign_model(out_dir: Path, seed: int = 100) -> Path:
    """A Llama model with a different tokenizer (trained on other text): must be refused."""
    tokenizer = train_tokenizer(out_dir / "foreign-tokenizer", vocab_size=480, skip=1000)
    config = _llama(len(tokenizer), hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32)
    return save_random_model(config, tokenizer, out_dir / "foreign-arm", seed=seed)


if __name__ == "__main__":
    import sys

    for name, path in build_tiny_family(Path(sys.argv[1])).items():
        print(name, path)
