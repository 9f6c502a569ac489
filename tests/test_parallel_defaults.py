"""Tensor-parallel engine defaults: the all-reduce fusion is left out at TP > 1 on CUDA only, and
never over a compilation config the user chose."""

from __future__ import annotations

import pytest
from vllm.platforms import current_platform

from server.vllm_glue.parallel import NO_ALLREDUCE_FUSION, apply_tensor_parallel_defaults


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no GPU: make the platform answer as CUDA's does (the GPU run used the real one).
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)


def test_fusion_left_out_at_tp2_on_cuda(on_cuda: None, capsys: pytest.CaptureFixture[str]) -> None:
    args = {"tensor_parallel_size": 2}
    assert apply_tensor_parallel_defaults(args)
    assert args["compilation_config"] == NO_ALLREDUCE_FUSION
    assert capsys.readouterr().err.count("genarm-serve: tensor parallel on CUDA") == 1


@pytest.mark.parametrize("args", [{"tensor_parallel_size": 1}, {},
                                  {"tensor_parallel_size": 2, "compilation_config": {"mode": 0}}])
def test_left_alone_at_tp1_or_when_the_user_chose(on_cuda: None, args: dict) -> None:
    before = dict(args)
    assert not apply_tensor_parallel_defaults(args)
    assert args == before


def test_left_alone_off_cuda() -> None:
    args = {"tensor_parallel_size": 2}
    assert not apply_tensor_parallel_defaults(args)
    assert "compilation_config" not in args
