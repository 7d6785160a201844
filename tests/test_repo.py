"""The repository stands alone: nothing cites a design brief that a user's clone does not have."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BRIEF = "DESIGN" + ".md"  # built from parts so this file does not match itself


def test_no_file_cites_a_design_brief_outside_the_repository():
    try:
        files = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    citing = [
        f for f in files
        if (ROOT / f).is_file() and BRIEF in (ROOT / f).read_text(errors="ignore")
    ]  # fmt: skip
    assert not citing, f"cite docs/design.md instead of {BRIEF}: {citing}"
    assert (ROOT / "docs" / "design.md").is_file()
