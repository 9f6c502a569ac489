"""bench/device_tree.sh: slimming what travels to the GPU machine must leave the files on disk and
restore to a clean tree (a slimmed tree shows the adapters as deleted: committing it would drop them)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.server_process import ROOT

ADAPTERS = ["server/default_arms/positive/adapter_model.safetensors",
            "server/default_arms/objective/adapter_model.safetensors",
            "bench/quality/arms/harmless/adapter_model.safetensors"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_slim_keeps_the_adapters_out_of_what_travels_and_restore_puts_them_back(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(repo)], check=True)
    # The script as it is in this checkout, run from elsewhere: it must work on its own repository.
    (repo / "bench/device_tree.sh").write_text((ROOT / "bench/device_tree.sh").read_text())
    git(repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "--allow-empty", "-am",
        "this checkout's script")
    script = ["bash", str(repo / "bench/device_tree.sh")]
    before = int(subprocess.run([*script, "size"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()[0])

    slim = subprocess.run([*script, "slim"], capture_output=True, text=True, check=True, cwd=tmp_path)
    travels = set(git(repo, "ls-files", "--cached", "--others", "--exclude-standard").split())
    assert not travels & set(ADAPTERS)
    assert all((repo / a).is_file() for a in ADAPTERS)  # still on disk: the server needs them
    assert int(slim.stdout.split()[0]) == before - sum((repo / a).stat().st_size for a in ADAPTERS)

    subprocess.run([*script, "restore"], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert git(repo, "status", "--porcelain") == ""
    assert set(ADAPTERS) <= set(git(repo, "ls-files").split())
    assert not any(a in (repo / ".git/info/exclude").read_text() for a in ADAPTERS)
