"""The one LoRA merge: a PEFT adapter folded into its base, written as a plain HF folder.

Merged in float32 whatever the base's dtype, then stored in the base's own dtype (or the one asked
for), so one adapter always gives the same merged ARM, whoever merges it (the server's adapter
cache, `genarm-train --merge`, `python -m rm_training.export`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genarm_common.errors import SetupError


def stored_dtype(folder: Path) -> Any:
    """The torch dtype a model folder's config.json records (float32 when it records none)."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype or torch.float32


def merge_lora(adapter: Path, base: Path, out: Path, dtype: str | None = None) -> Path:
    """Write base + adapter, merged, into the existing folder `out` (model, tokenizer).

    `dtype`: a torch dtype name to store in; None or "auto" keeps the base's. The tokenizer is the
    adapter's when it carries one (a trainer may add tokens), else the base's. Raises SetupError
    with one line when the adapter does not fit the base.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        store = stored_dtype(base) if dtype in (None, "auto") else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(store)
    except (OSError, ValueError, RuntimeError, AttributeError) as err:
        raise SetupError(f"adapter {adapter}: cannot merge onto {base}: {str(err).splitlines()[0]}") from None
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out)
    return out


def recorded_base(adapter: Path) -> str:
    """The base PEFT recorded in adapter_config.json (a path or hub id; '' when none)."""
    return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
