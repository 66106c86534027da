"""Shared fixtures."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _own_torch_extensions_dir():
    """DeepSpeed's CPU accelerator JIT-builds ``deepspeed_shm_comm`` into TORCH_EXTENSIONS_DIR
    (default ~/.cache/torch_extensions, shared by every venv on the machine). Two venvs using
    it in turn (e.g. CI's and a developer's) rewrite each other's build.ninja and rebuild the op
    on every launch (40-75 s each, seen here). One directory per venv: built once, then reused."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        yield
        return
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ["TORCH_EXTENSIONS_DIR"] = str(
        Path.home() / ".cache" / "torch_extensions_by_venv" / tag
    )
    try:
        yield
    finally:
        del os.environ["TORCH_EXTENSIONS_DIR"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh ALSACE_CACHE per test module: the embedded task is built from scratch there."""
    return tmp_path_factory.mktemp("alsace_cache")
