"""The request count that all API server processes share (server.admission), in real processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from server.admission import ADMISSION_FILE_ENV, Admission, SharedAdmission, admission_for, create_admission_file


def churn(path: str, rounds: int, start: multiprocessing.Barrier) -> None:
    admission = SharedAdmission(10**9, path)
    start.wait(60)
    for _ in range(rounds):
        assert admission.try_enter()
        admission.leave()


def hold(path: str, count: int, held: multiprocessing.Event, release: multiprocessing.Event) -> None:
    admission = SharedAdmission(3, path)
    for _ in range(count):
        assert admission.try_enter()
    held.set()
    release.wait(60)
    for _ in range(count):
        admission.leave()


def test_processes_count_against_one_limit(tmp_path: Path) -> None:
    path = create_admission_file(str(tmp_path))
    context = multiprocessing.get_context("spawn")  # as vLLM starts its API server processes
    held, release = context.Event(), context.Event()
    other = context.Process(target=hold, args=(str(path), 2, held, release))
    other.start()
    try:
        assert held.wait(60)
        here = SharedAdmission(3, path)
        assert here.count == 2
        assert here.try_enter()  # the third of three
        assert not here.try_enter()  # full: the other process holds two
        release.set()
        other.join(60)
        assert here.count == 1 and here.try_enter() and here.count == 2
    finally:
        release.set()
        other.join(60)


def test_concurrent_changes_are_not_lost(tmp_path: Path) -> None:
    path = create_admission_file(str(tmp_path))
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=churn, args=(str(path), 50_000, start)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert SharedAdmission(1, path).count == 0


def test_without_the_launchers_file_each_process_admits_its_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ADMISSION_FILE_ENV, raising=False)
    alone = admission_for(5, api_servers=2)
    assert type(alone) is Admission and alone.limit == 3
    monkeypatch.setenv(ADMISSION_FILE_ENV, str(create_admission_file(str(tmp_path))))
    shared = admission_for(5, api_servers=2)
    assert isinstance(shared, SharedAdmission) and shared.limit == 5
