"""ARMs given as LoRA adapters: merged once into a plain HF folder (cached), so vLLM serves them
like any model. The official GenARM ARMs, and what `genarm-train` writes, are adapters."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from server.compat import SetupError
from server.model_fetch import KNOWN_MODELS, cache_root, fetch_model

logger = logging.getLogger("genarm.adapters")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter: Path, serving_base: str) -> Path:
    """The model the adapter was trained on: its recorded path if present here, a model this
    project can fetch by name, else the serving base (the tokenizer check guards the choice)."""
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    info_file = adapter / "genarm_arm.json"
    name = json.loads(info_file.read_text()).get("base_model_name") if info_file.is_file() else None
    if name:
        if name in KNOWN_MODELS:
            return fetch_model(name)
    logger.warning("adapter %s: base %r not found here; merging onto the serving base %s", adapter, recorded, serving_base)
    return Path(serving_base)


def merge_adapter(adapter_dir: str | Path, serving_base: str) -> Path:
    """A merged HF folder for the adapter (built on first use, then reused from the cache)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir).expanduser().resolve()
    base = adapter_base(adapter, serving_base).resolve()
    digest = hashlib.sha256(str(base).encode())
    for file in sorted(adapter.iterdir()):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    target = cache_root() / "merged" / digest.hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    logger.warning("merging LoRA adapter %s onto %s (once; cached in %s)", adapter, base, target)
    try:
        # Merge in float32, store in the base's own dtype (what the engine would load anyway).
        stored = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(stored)
    except (OSError, ValueError, RuntimeError) as err:
        raise SetupError(f"adapter {adapter}: cannot merge onto {base}: {str(err).splitlines()[0]}") from None
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    merged.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)
    if (adapter / "genarm_arm.json").is_file():
        shutil.copy(adapter / "genarm_arm.json", staging / "genarm_arm.json")
    staging.rename(target)  # atomic: a half-written merge is never picked up
    return target


def resolve_arms(serving_base: str, arms: dict[str, str]) -> dict[str, str]:
    """ARM paths with every adapter replaced by its merged folder."""
    resolved = {}
    for name, path in arms.items():
        if Path(path).is_dir() and is_adapter(path):
            resolved[name] = str(merge_adapter(path, serving_base))
        else:
            resolved[name] = path
    return resolved
