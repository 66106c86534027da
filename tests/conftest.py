"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh ALSACE_CACHE per test module: the embedded task is built from scratch there."""
    return tmp_path_factory.mktemp("alsace_cache")
