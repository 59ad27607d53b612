"""The README and docs/ tell the truth about what CI runs and about the settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_the_example_config():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    example = (ROOT / "systemd" / "ingestd.toml").read_text()
    assert f"```toml\n{example}```" in reference


def test_config_reference_validates():
    from ingestd.config import Config, _build, validate

    validate(_build(Config, tomllib.loads((ROOT / "systemd" / "ingestd.toml").read_text()), ""))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests.*?```sh\n(.+?)\n```", readme, re.S)[1]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to '-'."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#+ (.*)", line)):
            text = re.sub(r"[^\w\- ]", "", heading[1].strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            if not destination.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and fragment not in _anchors(destination.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
