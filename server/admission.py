"""How many generation requests the server holds at once, counted across all its API server
processes, so that HTTP 429 means the server (not one of its processes) is full.

vLLM runs several API server processes with `--api-server-count N`, and `-dp N` makes N of them.
They accept from one listening socket and the kernel hands connections out unevenly: on two H200s,
one of two processes took 887 of a burst of 1,024 requests, so a per-process share of the limit
refused 119 requests while the server had room (bench/results/multigpu_gpu.md). One counter for all
processes fixes that: a 64-bit integer in a small file that every process maps, changed under an
exclusive `flock`. The standard library has no cross-process counter that spawned processes can
find by name (multiprocessing's locks and values are handed down at spawn time, which vLLM does,
not us), hence these few lines.

genarm-serve's launcher creates the file before vLLM starts and names it in ADMISSION_FILE_ENV,
which the API server processes inherit (server.vllm_glue.launcher).
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import struct
import tempfile
from pathlib import Path

logger = logging.getLogger("genarm.http")

ADMISSION_FILE_ENV = "GENARM_ADMISSION_FILE"
_COUNT = struct.Struct("q")


class Admission:
    """Requests admitted and not yet finished, in this process only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def try_enter(self) -> bool:
        """Admit one more request if the server has room."""
        if self._count >= self.limit:
            return False
        self._count += 1
        return True

    def leave(self) -> None:
        self._count -= 1


class SharedAdmission(Admission):
    """The same count, shared by every process that opens `path`."""

    def __init__(self, limit: int, path: str | os.PathLike[str]) -> None:
        super().__init__(limit)
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _COUNT.size)

    @property
    def count(self) -> int:
        return _COUNT.unpack_from(self._map)[0]

    def _add(self, delta: int, ceiling: int | None = None) -> bool:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value = _COUNT.unpack_from(self._map)[0]
            if ceiling is not None and value >= ceiling:
                return False
            _COUNT.pack_into(self._map, 0, value + delta)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def try_enter(self) -> bool:
        return self._add(1, self.limit)

    def leave(self) -> None:
        self._add(-1)


def create_admission_file(directory: str | None = None) -> Path:
    """A fresh counter file at zero (the launcher creates it and removes it at exit)."""
    fd, name = tempfile.mkstemp(prefix="genarm-admission-", dir=directory)
    os.write(fd, _COUNT.pack(0))
    os.close(fd)
    return Path(name)


def admission_for(server_limit: int, api_servers: int = 1) -> Admission:
    """The counter this process admits with: the shared one where the launcher created it; else
    (vLLM started some other way) one of its own, with its share of the server's limit."""
    path = os.environ.get(ADMISSION_FILE_ENV)
    if path:
        return SharedAdmission(server_limit, path)
    if api_servers > 1:
        logger.warning("genarm_http: no %s; each of %d API server processes admits its own share of %d requests",
                       ADMISSION_FILE_ENV, api_servers, server_limit)
    return Admission(math.ceil(server_limit / max(1, api_servers)))
