"""Shared fixtures: the tiny model families, built once per test session, offline."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.tiny_family import build_foreign_model, build_tiny_family

# vLLM's CPU build: a small KV cache and the in-process engine (fast start, little memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_family(tmp_path_factory.mktemp("tiny-family"))


@pytest.fixture(scope="session")
def foreign_arm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_foreign_model(tmp_path_factory.mktemp("foreign"))


@pytest.fixture()
def test_seed() -> int:
    """The seed of a test's random inputs: GENARM_TEST_SEED when set, else a fresh one each run;
    printed, so a failure names the seed that reproduces it."""
    seed = int(os.environ.get("GENARM_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"random inputs from GENARM_TEST_SEED={seed}")
    return seed
