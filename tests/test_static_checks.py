"""The static checks, enforced through the test suite (so by .ci/run too).

ruff (lint and format) over the package, the tests and the benchmarks, and
mypy --strict over the package, with the versions and settings pinned in
pyproject.toml. Caches go to tmp_path: the checkout stays as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["ingestd", "tests", "bench"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    command = " ".join(result.args[2:])
    assert result.returncode == 0, f"`{command}` found:\n{result.stdout}{result.stderr}"


def test_ruff_check() -> None:
    assert_clean(run("ruff", "check", "--no-cache", *CHECKED))


def test_ruff_format() -> None:
    assert_clean(run("ruff", "format", "--check", "--no-cache", *CHECKED))


@pytest.mark.timeout(300)
def test_mypy_strict(tmp_path: Path) -> None:
    assert_clean(run("mypy", "--strict", "--cache-dir", str(tmp_path), "ingestd"))
