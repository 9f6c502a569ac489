"""Per-request guidance weights: the weight table both model runners fill, the one reader the model
uses (`step_weights`), and the V1 logits processor that fills it on vLLM's V1 runner.

- `WeightTable` holds one float32 row per batch index (V1) or request slot (MRv2,
  server.vllm_glue.model_state); `set` never raises on request data.
- Each step's writer publishes a `WeightRows` (rows in the step's batch order) under the engine's
  `VllmConfig.instance_id`; `compute_logits` reads it with `step_weights`.

The V1 logits processor:
- Admission: the engine is configured with `weights_processor(spec)`, a processor class bound to
  the engine's own spec, so `validate_params` (a classmethod, run in the API server process)
  refuses a bad weight with the range and dimensions of the engine it goes to (HTTP 400).
- The step: `update_state` never raises on request data (a raise there would end every request in
  flight); a row it cannot read is served by the base alone, logged once and counted.
- `apply` does nothing: the model fuses in `compute_logits`, reading its engine's table through
  `step_weights`.
"""

from __future__ import annotations

import copyreg
import functools
import json
from abc import ABCMeta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.sampling_params import SamplingType
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from server.fusion import WeightError, validate_weight_value
from server.guidance import PROMPT_LOGPROBS_UNSUPPORTED, WEIGHT_ARG_PREFIX, GuidanceSpec
from server.metrics import report_fallback
from server.vllm_glue.spec import engine_spec

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

# The current step's rows of each engine (VllmConfig.instance_id) in this process, for its model to
# read. Last one wins: vLLM builds the V1 processors again when it rebuilds its persistent batch.
_STEPS: dict[str, WeightRows] = {}


class WeightRows:
    """The weights of the rows of one step, as the model's compute_logits sees them.

    `device_rows` holds only the active ARMs' columns, chosen on the host: indexing a device
    tensor with a Python list in compute_logits would copy the index synchronously and stall the
    step until the forward pass has finished."""

    def __init__(self, host_rows: np.ndarray, device_rows: torch.Tensor, active_arms: list[int],
                 any_row_count: bool = False) -> None:
        self.host_rows = host_rows  # [batch, K] float32: every ARM's weight (what was published)
        self.device_rows = device_rows  # [batch, len(active_arms)] float32 on the model's device
        self.active_arms = active_arms  # ARMs with a non-zero weight in some row
        # A dummy (profiling) step of MRv2: every row count is this step's, weights all 0.
        self.any_row_count = any_row_count

    @classmethod
    def empty(cls, num_arms: int, device: torch.device) -> WeightRows:
        """No rows: a step without requests (dummy and warm-up runs) guides nothing."""
        return cls(np.zeros((0, num_arms), np.float32), torch.zeros((0, 0), device=device), [])

    @classmethod
    def dummy_step(cls, num_arms: int, device: torch.device) -> WeightRows:
        """Every ARM at weight 0, whatever the row count: a profiling run then includes the ARMs'
        logits in the memory peak (their weight 0 leaves the base's logprobs as they are)."""
        return cls(np.zeros((0, num_arms), np.float32), torch.zeros((0, num_arms), device=device),
                   list(range(num_arms)), any_row_count=True)

    def for_rows(self, num_rows: int) -> tuple[torch.Tensor, list[int]]:
        """Weights [num_rows, len(active)] and the active ARMs, for a step of `num_rows` rows."""
        rows = self.device_rows
        if rows.shape[0] == num_rows:
            return rows, self.active_arms
        if self.any_row_count:
            return rows.new_zeros((num_rows, len(self.active_arms))), self.active_arms
        if rows.shape[0] > 0:  # requests are waiting on these rows: they get the base alone
            report_fallback(
                "row_count_mismatch",
                f"GenARM: the model computes {num_rows} rows but the weight table holds {rows.shape[0]}; "
                "this step is served by the base model alone",
            )
        # Without requests (dummy and warm-up runs) there is nothing to guide.
        return rows.new_zeros((num_rows, 0)), []


def publish_step(instance_id: str, rows: WeightRows) -> None:
    """The rows `step_weights` returns for this engine until the next publication."""
    _STEPS[instance_id] = rows


def step_weights(instance_id: str, num_rows: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Weights [num_rows, K] of the engine's current step and the ARMs they use (none: base alone)."""
    rows = _STEPS.get(instance_id)
    if rows is None:
        report_fallback(
            "no_weight_table",
            f"GenARM: engine {instance_id} has no weight table (neither its logits processor nor its "
            "model state is loaded); serving the base model alone",
        )
        return torch.zeros((num_rows, 0), device=device), []
    return rows.for_rows(num_rows)


class WeightTable:
    """One float32 weight row per index (V1: batch index; MRv2: request slot), host memory."""

    def __init__(self, spec: GuidanceSpec, num_rows: int) -> None:
        self.spec = spec
        self.values = np.zeros((num_rows, len(spec.dimensions)), np.float32)

    def set(self, index: int, extra_args: dict[str, Any] | None) -> None:
        """Row `index` from a request's extra_args. Never raises on request data: a raise in the
        step would end every request in flight, so an unusable row is served by the base alone."""
        try:
            self.values[index] = self.spec.row_from_extra_args(extra_args)
        except WeightError as err:  # admitted without this engine's checks
            report_fallback("invalid_weights", f"GenARM: a request's weights are unusable ({err}); "
                                               "it is served by the base model alone")
            self.values[index] = 0.0

    def clear(self, index: int) -> None:
        self.values[index] = 0.0

    def gather(self, order: np.ndarray | slice, device: torch.device, pin: bool) -> WeightRows:
        """The rows of `order` (a step's batch order), their active ARMs' columns as a fresh device
        tensor. Never written in place, so a step still in flight on the device keeps reading the
        rows it was launched with (asynchronous scheduling); a pinned source keeps its block until
        its copy has run."""
        current = np.array(self.values[order], copy=True)
        active = [int(k) for k in np.flatnonzero((current != 0).any(axis=0))]
        rows = torch.from_numpy(np.ascontiguousarray(current[:, active]))
        if pin:
            rows = rows.pin_memory()
        return WeightRows(current, rows.to(device, non_blocking=pin), active)


class GenARMWeights(LogitsProcessor):
    """Keeps row b's guidance weights for request b of the persistent batch."""

    admission_spec: GuidanceSpec | None = None  # set on the classes weights_processor() binds
    seeded_refusal: str | None = None  # ditto: why seeded sampling is refused (server.cpu_defaults)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if getattr(sampling_params, "prompt_logprobs", None) is not None:
            raise ValueError(PROMPT_LOGPROBS_UNSUPPORTED)
        if cls.seeded_refusal and sampling_params.sampling_type == SamplingType.RANDOM_SEED:
            raise ValueError(cls.seeded_refusal)
        extra_args = getattr(sampling_params, "extra_args", None)
        if cls.admission_spec is not None:  # raises WeightError (a ValueError): HTTP 400
            cls.admission_spec.row_from_extra_args(extra_args)
            return
        # Loaded by name, without its engine's spec: what can be checked without one.
        for key, value in (extra_args or {}).items():
            if key.startswith(WEIGHT_ARG_PREFIX):
                validate_weight_value(key[len(WEIGHT_ARG_PREFIX):], value)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.spec = engine_spec(vllm_config)  # the engine's own, whatever class carried it here
        self.device = device
        self.pin = is_pin_memory
        num_arms = len(self.spec.dimensions) if self.spec else 0
        self.instance_id = vllm_config.instance_id
        self.weights = WeightTable(self.spec, vllm_config.scheduler_config.max_num_seqs) if self.spec else None
        self.batch_size = 0
        self.rows = WeightRows.empty(num_arms, device)
        if self.spec is not None:
            publish_step(self.instance_id, self.rows)

    def is_argmax_invariant(self) -> bool:
        return True  # apply() leaves the logits alone; the fusion happens in the model

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self.weights is None:
            return
        table = self.weights.values
        for index in batch_update.removed:
            self.weights.clear(index)
        for index, params, _, _ in batch_update.added:
            self.weights.set(index, getattr(params, "extra_args", None))
        for src, dst, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                table[[src, dst]] = table[[dst, src]]
            else:
                table[dst] = table[src]
        self.batch_size = batch_update.batch_size
        # V1's batch index is the row: the step's order is the table's first rows.
        self.rows = self.weights.gather(slice(0, self.batch_size), self.device, self.pin)
        publish_step(self.instance_id, self.rows)


class _BoundToSpec(ABCMeta):
    """Metaclass of the processor classes bound to one engine's spec."""


@functools.cache
def _bound_class(spec_json: str, seeded_refusal: str | None = None) -> type[GenARMWeights]:
    spec = GuidanceSpec.from_dict(json.loads(spec_json))
    return _BoundToSpec("BoundGenARMWeights", (GenARMWeights,),
                        {"admission_spec": spec, "seeded_refusal": seeded_refusal, "__module__": __name__})


def weights_processor(spec: GuidanceSpec, seeded_refusal: str | None = None) -> type[GenARMWeights]:
    """The processor class for an engine serving `spec` (the entry of its `logits_processors`)."""
    return _bound_class(spec.to_json(), seeded_refusal)


def _pickle_by_spec(cls: _BoundToSpec) -> tuple[Any, tuple[str, str | None]]:
    return _bound_class, (cls.admission_spec.to_json(), cls.seeded_refusal)


# vLLM hands its config, processor classes included, to its other processes by pickling; a class
# is pickled by name, and a bound class has none to be found by: pickle it as its spec instead.
copyreg.pickle(_BoundToSpec, _pickle_by_spec)
