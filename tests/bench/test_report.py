"""bench/report.py names the commit a section ran on and says when later commits changed what it measures."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from bench.common import REPO, git_commit, machine
from bench.report import _conditions, later_changes


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def _doc(sha: str) -> dict[str, Any]:
    return {
        "benchmark": "http",
        "commit": {"sha": sha, "dirty": False},
        "machine": machine(),
        "config": {"threads": 2, "quick": False},
    }


@pytest.fixture
def history() -> tuple[str, str]:
    """(HEAD, the parent of the last commit (not a merge) that changed service/)."""
    try:
        head = _git("rev-parse", "HEAD")
        last = _git("log", "-1", "--no-merges", "--format=%H", "--", "service")
        return head, _git("rev-parse", f"{last}^")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no git history here: {e}")


def test_a_section_from_before_a_service_change_says_it_is_older(history: tuple[str, str]) -> None:
    _, before = history
    later = later_changes(_doc(before))
    assert later, "the commit that changed service/ comes after the run"
    last = _git("rev-parse", "--short", _git("log", "-1", "--no-merges", "--format=%H", "--", "service"))
    assert last in [c.split()[0] for c in later]  # merged branches may bring later-dated commits too
    line = _conditions(_doc(before))
    assert f"commit `{before[:7]}`" in line and "**Older than the code it measures:**" in line
    assert "python -m bench http_load" in line


def test_a_section_from_head_is_current(history: tuple[str, str]) -> None:
    head, _ = history
    assert later_changes(_doc(head)) == []
    assert "Older than" not in _conditions(_doc(head))


def test_result_files_record_the_commit(history: tuple[str, str]) -> None:
    head, _ = history
    commit = git_commit()
    assert commit is not None and commit["sha"] == head and isinstance(commit["dirty"], bool)
