"""ARMs given as LoRA adapters: merged once into a plain HF folder (cached), so vLLM serves them
like any model. The official GenARM ARMs, and what `genarm-train` writes, are adapters."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from genarm_common.folders import publish_once, staging_dir
from genarm_common.lora_merge import merge_lora, recorded_base
from genarm_common.model_fetch import KNOWN_MODELS, cache_root, fetch_model

logger = logging.getLogger("genarm.adapters")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter: Path, serving_base: str) -> Path:
    """The model the adapter was trained on: its recorded path if present here, a model this
    project can fetch by name, else the serving base (the tokenizer check guards the choice)."""
    recorded = recorded_base(adapter)
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
    staging = staging_dir(target)
    try:
        merge_lora(adapter, base, staging)
        if (adapter / "genarm_arm.json").is_file():
            shutil.copy(adapter / "genarm_arm.json", staging / "genarm_arm.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_once(staging, target)  # atomic: a half-written merge is never picked up


def resolve_arms(serving_base: str, arms: dict[str, str]) -> dict[str, str]:
    """ARM paths with every adapter replaced by its merged folder."""
    resolved = {}
    for name, path in arms.items():
        if Path(path).is_dir() and is_adapter(path):
            resolved[name] = str(merge_adapter(path, serving_base))
        else:
            resolved[name] = path
    return resolved
