"""Shared fixtures, kept small and generic."""

from __future__ import annotations

from pathlib import Path

import pytest

MEASURED = Path(__file__).resolve().parents[1] / "backends" / "costmodel" / "data" / "measured"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The published sweep tables (the calibration set, kept in the repository: never skipped)."""
    assert MEASURED.is_dir(), MEASURED
    return MEASURED
