"""Tensor-parallel engine defaults on CUDA: what the guided engine needs at TP > 1."""

from __future__ import annotations

import sys
from typing import Any

# On two H200s with NVLink multicast off (as shared machines require), vLLM 0.26's FlashInfer
# all-reduce + RMSNorm fusion (its "mnnvl" backend) hit an illegal memory access while the guided
# engine captured CUDA graphs at TP=2 (bench/results/multigpu_gpu.md); without it TP=2 ran and met
# the correctness criterion. The fusion only saves one kernel per layer, so it is left out unless
# the user chose a compilation config.
NO_ALLREDUCE_FUSION = {"pass_config": {"fuse_allreduce_rms": False}}
NOTE = ("tensor parallel on CUDA: vLLM's FlashInfer all-reduce + RMSNorm fusion is off (it crashed "
        "at TP=2 with multicast off); a --compilation-config of yours overrides this")


def apply_tensor_parallel_defaults(args: dict[str, Any]) -> bool:
    """Leave out the all-reduce fusion at TP > 1 on CUDA unless the user chose a compilation
    config; says so in one line. Returns whether it changed `args`."""
    if int(args.get("tensor_parallel_size") or 1) <= 1 or args.get("compilation_config") is not None:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False
    args["compilation_config"] = {key: dict(value) for key, value in NO_ALLREDUCE_FUSION.items()}
    print(f"genarm-serve: {NOTE}", file=sys.stderr, flush=True)
    return True
