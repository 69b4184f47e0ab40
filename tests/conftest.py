"""Shared by every test."""

from __future__ import annotations

import pytest

from safeanchor import logs


@pytest.fixture(autouse=True)
def _safeanchor_logging():
    """Every test starts and ends with the "safeanchor" logger at the library defaults
    (`safeanchor.logs.reset()`: no console handler, records propagate to the root logger, where
    pytest's caplog listens). A test that runs a workflow's main() calls `logs.setup()`, which
    stops the propagation; without this, caplog would see nothing in the tests after it."""
    logs.reset()
    yield
    logs.reset()
