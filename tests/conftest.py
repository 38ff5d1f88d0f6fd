"""Shared fixtures, kept small and generic."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared data folder (published sweep tables); skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data directory absent")
    return SHARED_DATA
