"""Model folders written atomically: staged in a hidden sibling, then renamed into place, so a killed
writer never leaves a half-written folder where a reader looks."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """An empty hidden folder beside `target` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def make_shared(folder: Path) -> None:
    """Permissions as the umask allows (mkdtemp makes 0700 folders; a model folder is shared)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(staging: Path, target: Path) -> Path:
    """Rename `staging` to `target`; an existing `target` is replaced (moved aside, then removed)."""
    make_shared(staging)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def replaced_on_success(target: Path) -> Iterator[Path]:
    """A staging folder to write `target` into: renamed onto it (replacing it) when the block ends,
    removed when the block raises."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_once(staging: Path, target: Path) -> Path:
    """Rename `staging` to `target` unless another writer got there first (replicas sharing one
    cache build the same folder at once): then its folder stands and ours is dropped."""
    make_shared(staging)
    try:
        staging.rename(target)
    except OSError as err:
        # rename() onto an existing non-empty folder fails with ENOTEMPTY (EEXIST on some systems).
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
