"""Per-request weights on vLLM's Model Runner V2: the composite model's model state.

MRv2 (vLLM >= 0.26, `vllm.v1.worker.gpu`) builds `model.get_model_state_cls()` once per worker and
calls it on the worker before each forward pass (docs/design/mrv2.md, section 1):
- `add_request(slot, new_req_data)`: a request (new, or resumed after preemption) got a fixed slot;
  its weights are read from `sampling_params.extra_args` into that slot's row (slots are recycled,
  so the whole row is overwritten).
- `remove_request(req_id)`: finished or preempted; the slot number is not passed, hence `slot_of`.
- `prepare_inputs(input_batch, ...)`: every step, real and dummy; the rows of this step in batch
  order (`idx_mapping_np`: batch row -> slot) are published for `compute_logits`, which runs in
  this step's `sample_tokens` before any other step's `prepare_inputs`.
Nothing here raises on request data (a raise would end every request in flight): an unusable row
is served by the base alone, logged once and counted (server.vllm_glue.weights.WeightTable).
Imported lazily (by `GenARMForCausalLM.get_model_state_cls`), so the V1 path never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from server.guidance import GuidanceSpec
from server.vllm_glue.spec import engine_spec
from server.vllm_glue.weights import WeightRows, WeightTable, publish_step

if TYPE_CHECKING:
    from torch import nn
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.states import RequestState


# Request ids of MRv2's kernel warm-up (v1/worker/gpu/warmup.py); they hold whole batches. The last
# two are vLLM 0.33's model-specific warm-ups, which our model never runs: listed so it never matters.
VLLM_WARMUP_PREFIXES = ("_warmup_", "_v2_mixed_warmup", "_sparse_mla_v2_warmup", "_step5_dsa_warmup")


class StepBatch(Protocol):
    """What the slot logic reads of MRv2's InputBatch (the same names)."""

    req_ids: list[str]
    num_reqs: int
    idx_mapping_np: np.ndarray


class SlotWeights:
    """The weight rows of MRv2's request slots, and the rows published for each step.

    Plain Python (no vLLM base class), so its logic is testable without the MRv2 runner."""

    def __init__(self, spec: GuidanceSpec, num_slots: int, instance_id: str, device: torch.device) -> None:
        self.table = WeightTable(spec, num_slots)
        self.num_arms = len(spec.dimensions)
        self.instance_id = instance_id
        self.device = device
        self.pin = device.type == "cuda"  # pinned host memory: an asynchronous copy
        self.slot_of: dict[str, int] = {}
        self.version = 0  # bumped on every table change: the cached step rows are stale
        self._cached: tuple[tuple[int, bytes], WeightRows] | None = None

    def add(self, slot: int, req_id: str, extra_args: dict[str, Any] | None) -> None:
        self.table.set(slot, extra_args)
        self.slot_of[req_id] = slot
        self.version += 1

    def remove(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self.table.clear(slot)
            self.version += 1

    def publish(self, batch: StepBatch) -> WeightRows:
        """Publish this step's rows (batch order) for compute_logits, and return them."""
        first = batch.req_ids[0] if batch.num_reqs > 0 else None
        if first is not None and (first not in self.slot_of or first.startswith(VLLM_WARMUP_PREFIXES)):
            # A dummy batch (profiling, idle DP rank: its req_ids were never added) or vLLM's own
            # kernel warm-up, whose requests ask for prompt logprobs (a second compute_logits call
            # with one row per prompt token): every ARM at weight 0, for any row count.
            rows = WeightRows.dummy_step(self.num_arms, self.device)
        else:
            order = np.asarray(batch.idx_mapping_np[: batch.num_reqs], dtype=np.int64)
            key = (self.version, order.tobytes())
            # Steady decode (same requests, same order): reuse the rows already on the device.
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, self.table.gather(order, self.device, self.pin))
            rows = self._cached[1]
        publish_step(self.instance_id, rows)
        return rows


class GenARMModelState(DefaultModelState):
    """DefaultModelState plus the per-request guidance weights (MRv2's per-request state hook)."""

    supports_prompt_embeds: ClassVar[bool] = False  # read by vLLM >= 0.33; each sub-model embeds ids

    def __init__(self, vllm_config: VllmConfig, model: nn.Module, encoder_cache: Any, device: torch.device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        spec = engine_spec(vllm_config)
        if spec is None:  # the composite model refuses to build without one; this cannot happen
            raise ValueError("GenARMModelState needs a guided engine's config")
        self.weights = SlotWeights(spec, self.max_num_reqs, vllm_config.instance_id, device)

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        self.weights.add(req_index, new_req_data.req_id, params.extra_args if params is not None else None)

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.weights.remove(req_id)

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, torch.Tensor | None]:
        out = super().prepare_inputs(input_batch, req_states)
        self.weights.publish(input_batch)
        return out  # no new forward kwargs: CUDA graph inputs are unchanged
