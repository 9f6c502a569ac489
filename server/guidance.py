"""The guidance spec: reward dimensions, default weights, the allowed range, and how a request's
weights are read and checked. One definition for the engine (through `server.vllm_glue`), the
HTTP layer and the start-up checks; nothing here knows vLLM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from server.fusion import WeightError, validate_weight_value

WEIGHT_ARG_PREFIX = "genarm_weight_"  # SamplingParams.extra_args / vllm_xargs key per dimension
# Refused by the HTTP layer on every runner and by the V1 processor at admission.
PROMPT_LOGPROBS_UNSUPPORTED = (
    "prompt_logprobs is not supported with GenARM guidance (logprobs of generated tokens are)"
)


@dataclass
class GuidanceSpec:
    dimensions: list[str]
    default_weights: list[float]
    min_weight: float = -10.0
    max_weight: float = 10.0
    # What the engine fuses (empty where only validation is needed):
    arm_paths: list[str] = field(default_factory=list)
    base_architectures: list[str] = field(default_factory=list)
    vocab_size: int = 0  # ids the fused step covers (see genarm_common.model_checks.fused_vocab_size)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal specs give equal text."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuidanceSpec:
        return cls(**dict(data))

    def check(self, dimension: str, value: object) -> float:
        """One weight: a finite number inside the allowed range."""
        value = validate_weight_value(dimension, value)
        if not self.min_weight <= value <= self.max_weight:
            raise WeightError(
                f"weight {dimension!r}={value} is outside the allowed range "
                f"[{self.min_weight}, {self.max_weight}]",
                dimension,
            )
        return value

    def row(self, weights: Mapping[str, object] | None) -> list[float]:
        """A request's weight row: None -> the defaults; a mapping -> those weights, 0 for the
        dimensions it leaves out ({} is the base model alone)."""
        if weights is None:
            return list(self.default_weights)
        for name in weights:
            if name not in self.dimensions:
                raise WeightError(
                    f"unknown reward dimension {name!r}; this model has {self.dimensions}", name
                )
        return [self.check(d, weights.get(d, 0.0)) for d in self.dimensions]

    def row_from_extra_args(self, extra_args: Mapping[str, object] | None) -> list[float]:
        """The row from SamplingParams.extra_args: no `genarm_weight_*` key means the defaults."""
        given = {
            key[len(WEIGHT_ARG_PREFIX) :]: value
            for key, value in (extra_args or {}).items()
            if key.startswith(WEIGHT_ARG_PREFIX)
        }
        return self.row(given or None)

    def extra_args(self, weights: Mapping[str, object] | None) -> dict[str, float]:
        """SamplingParams.extra_args carrying a request's weights (every dimension, explicitly)."""
        return {f"{WEIGHT_ARG_PREFIX}{d}": w for d, w in zip(self.dimensions, self.row(weights), strict=True)}

    def as_mapping(self, row: list[float]) -> dict[str, float]:
        return dict(zip(self.dimensions, row, strict=True))


def unbounded_spec(dimensions: list[str]) -> GuidanceSpec:
    """Any finite weights, defaults 0 (the reference decoder's view)."""
    return GuidanceSpec(list(dimensions), [0.0] * len(dimensions), -math.inf, math.inf)
