"""The per-request output folders: named after their process, kept until Cog has read them."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from codeformer.serving.outputs import (
    OUTPUT_DIR_PREFIX,
    OutputFolders,
    new_output_dir,
    owner_pid_alive,
    remove_orphaned_output_dirs,
)


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])  # noqa: S603, S607
    process.wait()
    return process.pid


def test_a_new_folder_is_named_after_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = new_output_dir()
    assert folder.parent == tmp_path and folder.is_dir()
    assert folder.name.startswith(f"{OUTPUT_DIR_PREFIX}{os.getpid()}-")
    assert owner_pid_alive(folder)


def test_output_folders_of_processes_that_are_gone_are_removed(tmp_path: Path) -> None:
    ours = tmp_path / f"{OUTPUT_DIR_PREFIX}{os.getpid()}-abc"
    orphan = tmp_path / f"{OUTPUT_DIR_PREFIX}{_exited_pid()}-def"
    unrelated = tmp_path / "codeformer-other"
    for folder in (ours, orphan, unrelated):
        folder.mkdir()
    assert remove_orphaned_output_dirs(tmp_path) == 1
    assert ours.exists() and unrelated.exists() and not orphan.exists()


def test_a_folder_without_a_process_id_in_its_name_is_not_taken_for_an_orphan(tmp_path: Path) -> None:
    folder = tmp_path / f"{OUTPUT_DIR_PREFIX}manual-copy"
    folder.mkdir()
    assert owner_pid_alive(folder)
    assert remove_orphaned_output_dirs(tmp_path) == 0 and folder.exists()


def test_a_returned_folder_is_kept_until_its_retention_has_passed(tmp_path: Path) -> None:
    kept, expired = tmp_path / "kept", tmp_path / "expired"
    for folder in (kept, expired):
        folder.mkdir()
    long_retention, no_retention = OutputFolders(retention_s=3600.0), OutputFolders(retention_s=0.0)
    long_retention.returned(kept)
    no_retention.returned(expired)
    long_retention.discard_expired()
    no_retention.discard_expired()
    assert kept.exists() and not expired.exists()
    long_retention.discard_all()  # the worker's exit: whatever is left
    assert not kept.exists()
