"""Start-up checks that a base and its ARMs can be fused: files present, one tokenizer.

Everything here reads small files (config.json, tokenizer files) only, so a bad setup fails
in seconds with one clear line per problem, before any weights are loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from genarm_common.errors import SetupError

SPECIAL_TOKEN_ATTRS = ("bos_token", "eos_token", "unk_token")


def _collect(checks: dict[str, Any]) -> dict[str, Any]:
    """Run every check (name -> zero-argument callable); raise one SetupError listing all failures."""
    results, problems = {}, []
    for name, check in checks.items():
        try:
            results[name] = check()
        except SetupError as err:
            problems.append(str(err))
    if problems:
        raise SetupError("\n".join(problems))
    return results


@dataclass(frozen=True)
class ModelFolder:
    """A model folder that passed the file checks."""

    role: str  # "base" or the ARM's reward dimension
    path: Path
    embedding_rows: int  # config.vocab_size: the width of the model's logits


def check_model_folder(role: str, path: str | Path, require_weights: bool = True) -> ModelFolder:
    """config.json, weights and a tokenizer must be there; returns the logits width.

    require_weights=False is for vLLM's `load_format="dummy"` (benchmarks on random weights)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SetupError(f"{role}: model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise SetupError(f"{role}: {folder} has no config.json (is it a Hugging Face model folder?)")
    if require_weights and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise SetupError(f"{role}: {folder} has no weights (*.safetensors or *.bin)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise SetupError(f"{role}: {folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    config = AutoConfig.from_pretrained(folder)
    text_config = config.get_text_config()
    return ModelFolder(role=role, path=folder, embedding_rows=int(text_config.vocab_size))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the vocabulary and special tokens: equal fingerprints mean fusable models."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {attr: getattr(tokenizer, attr) for attr in SPECIAL_TOKEN_ATTRS},
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def describe_tokenizer_difference(
    base: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, vocab_size: int
) -> str | None:
    """None if `other` maps ids < vocab_size like `base`, else the first difference, in words.

    Ids past vocab_size (e.g. an added pad token: 32001 vs 32000 rows) may differ: the fused
    step never samples them.
    """
    for attr in SPECIAL_TOKEN_ATTRS:
        a, b = getattr(base, attr), getattr(other, attr)
        if a != b:
            return f"{attr} differs: {a!r} vs {b!r}"
    by_id_base = {i: t for t, i in base.get_vocab().items() if i < vocab_size}
    by_id_other = {i: t for t, i in other.get_vocab().items() if i < vocab_size}
    for idx in range(vocab_size):
        if by_id_base.get(idx) != by_id_other.get(idx):
            return (
                f"token id {idx} is {by_id_base.get(idx)!r} in the base "
                f"but {by_id_other.get(idx)!r} here"
            )
    return None


def check_shared_tokenizer(
    base_tokenizer: PreTrainedTokenizerBase,
    arms: dict[str, PreTrainedTokenizerBase],
    arm_paths: dict[str, Path],
    vocab_size: int,
) -> None:
    problems = []
    for name, tokenizer in arms.items():
        difference = describe_tokenizer_difference(base_tokenizer, tokenizer, vocab_size)
        if difference is not None:
            problems.append(
                f"ARM {name!r} ({arm_paths[name]}) does not share the base model's tokenizer: "
                f"{difference}"
            )
    if problems:
        raise SetupError("\n".join(problems))


def fused_vocab_size(tokenizer: PreTrainedTokenizerBase, folders: list[ModelFolder]) -> int:
    """The ids every model can score: min(tokenizer length, each model's embedding rows).

    A tokenizer can carry tokens past a model's table (transformers adds a pad token to Qwen2
    tokenizers; Llama ARMs trained with an added pad have 32001 rows against the base's 32000):
    those ids are left out of the fused step, so they are never sampled. EOS must stay in.
    """
    vocab_size = min([len(tokenizer), *(f.embedding_rows for f in folders)])
    for special in ("eos_token_id", "bos_token_id"):
        idx = getattr(tokenizer, special)
        if idx is not None and idx >= vocab_size:
            smallest = min(folders, key=lambda f: f.embedding_rows)
            raise SetupError(
                f"{smallest.role}: {smallest.path} has {smallest.embedding_rows} embedding rows, "
                f"so it cannot score the tokenizer's {special.removesuffix('_id')} (id {idx})"
            )
    return vocab_size


@dataclass(frozen=True)
class FusionSetup:
    """A base and its ARMs, checked to be fusable."""

    base: ModelFolder
    arms: dict[str, ModelFolder]  # reward dimension -> folder, in the order of the weight row
    vocab_size: int  # the fused step works on ids < vocab_size (see fused_vocab_size)
    tokenizer_sha256: str


def check_fusion_setup(
    base_path: str | Path, arm_paths: dict[str, str | Path], require_weights: bool = True
) -> FusionSetup:
    """All start-up checks for a base + ARMs; raises SetupError with one line on the first problem."""
    if not arm_paths:
        raise SetupError("at least one ARM is needed (--arm NAME=PATH)")
    folders = _collect(
        {"": lambda: check_model_folder("base", base_path, require_weights)}  # ARM names are never empty
        | {
            name: (lambda n=name, p=path: check_model_folder(f"ARM {n!r}", p, require_weights))
            for name, path in arm_paths.items()
        }
    )
    base = folders.pop("")
    arms = folders
    base_tokenizer = load_tokenizer(base.path)
    vocab_size = fused_vocab_size(base_tokenizer, [base, *arms.values()])
    check_shared_tokenizer(
        base_tokenizer,
        {name: load_tokenizer(folder.path) for name, folder in arms.items()},
        {name: folder.path for name, folder in arms.items()},
        vocab_size,
    )
    return FusionSetup(
        base=base,
        arms=arms,
        vocab_size=vocab_size,
        tokenizer_sha256=tokenizer_fingerprint(base_tokenizer),
    )
