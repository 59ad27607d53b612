"""The README tells the truth about what CI runs and about the settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_the_example_config():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "systemd" / "ingestd.toml").read_text()
    assert f"```toml\n{example}```" in readme


def test_readme_config_reference_validates():
    from ingestd.config import Config, _build, validate

    validate(_build(Config, tomllib.loads((ROOT / "systemd" / "ingestd.toml").read_text()), ""))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests.*?```sh\n(.+?)\n```", readme, re.S)[1]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
