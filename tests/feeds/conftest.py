"""Shared fixtures for the feeds tests: the real feed samples beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository is /work/main locally and a clone elsewhere in CI; shared/ is always beside it.
REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES_DIR = REPO_ROOT.parent / "shared" / "feeds-samples"


@pytest.fixture
def samples() -> Path:
    """The folder of real feed excerpts (skips the test if it is absent)."""
    if not SAMPLES_DIR.is_dir():
        pytest.skip(f"feed samples folder {SAMPLES_DIR} is absent (it lives beside the repo)")
    return SAMPLES_DIR
