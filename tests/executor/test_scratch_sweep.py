"""Scratch roots of executors that died without cleaning up are swept at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from executor_core.scratch import OWNER_FILE, SCRATCH_PREFIX, sweep_stale_scratch_roots


def make_root(parent: Path, name: str, pid: int | None) -> Path:
    root = parent / (SCRATCH_PREFIX + name)
    (root / "w0").mkdir(parents=True)
    if pid is not None:
        (root / OWNER_FILE).write_text(str(pid))
    return root


def test_only_roots_of_dead_owners_are_removed(tmp_path: Path) -> None:
    """Dead owner: removed. Live owner, or no owner file: kept."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = make_root(tmp_path, "gone", int(dead.stdout))
    mine = make_root(tmp_path, "mine", os.getpid())
    unknown = make_root(tmp_path, "unknown", None)
    other = tmp_path / "unrelated"
    other.mkdir()
    assert sweep_stale_scratch_roots(str(tmp_path)) == 1
    assert not gone.exists()
    assert mine.exists()
    assert unknown.exists()
    assert other.exists()
