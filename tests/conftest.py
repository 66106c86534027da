"""Shared fixtures, the suite's tiers, and its hermetic caches.

Hermetic: nothing an earlier session left on the machine can stand in for a download or a
build. Before any test module is imported, :func:`pytest_configure` points every cache the
suite reads or fills at one fresh folder of this session (removed at the end): the asset
cache (``ALSACE_CACHE``: downloaded wheels, built models), the Hugging Face caches
(``HF_HOME``: hub and datasets), pip's cache (a test's ``pip download`` really asks the
index) and matplotlib's. DeepSpeed's JIT-built CPU op goes to ``<venv>/torch_extensions``:
it belongs to the venv it was built against, and a fresh clone builds its own.

Tiers (markers; ``make test`` runs them all): ``unit`` (in-process, seconds: the default of
every test that is not marked otherwise), ``launch`` (starts the real entry point or ranks,
or fetches a package), ``slurm`` (submits real jobs to the local Slurm cluster). The fast
tier: ``make test-unit`` (``pytest -m unit``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from alsace_ds.tools.procs import torch_extensions_dir

TIERS = ("unit", "launch", "slurm")
_SESSION: dict[str, Path] = {}


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in (
        ("unit", "in-process tests (the fast tier, the default of an unmarked test)"),
        ("launch", "starts the entry point / ranks, or fetches a package"),
        ("slurm", "submits real jobs to the local Slurm cluster (root)"),
    ):
        config.addinivalue_line("markers", f"{tier}: {what}")
    root = Path(tempfile.mkdtemp(prefix="alsace-test-caches-"))
    _SESSION["root"] = root
    os.environ["ALSACE_CACHE"] = str(root / "alsace_ds")
    os.environ["HF_HOME"] = str(root / "huggingface")
    os.environ["PIP_CACHE_DIR"] = str(root / "pip")
    os.environ["MPLCONFIGDIR"] = str(root / "matplotlib")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))


def pytest_unconfigure(config: pytest.Config) -> None:
    root = _SESSION.pop("root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without a tier marker is a unit test; ``slurm`` implies nothing else."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


def shared_dir(tmp_path_factory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (the workers'
    basetemps share a parent; without xdist, the basetemp)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def once(tmp_path_factory, name: str):
    """Serialise the workers on ``name``: yields ``(folder, done)``; the first to get the
    lock makes the folder's contents (``done`` False) and the others then reuse them."""
    root = shared_dir(tmp_path_factory)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folder = root / name
        yield folder, (folder / "done").is_file()
        (folder / "done").touch()


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """The ALSACE_CACHE of the session's runs, shared by the xdist workers: the embedded task
    and its tiny models are built from scratch there once (by the first run, its ranks
    racing to build: the builder is race-safe), then reused."""
    folder = shared_dir(tmp_path_factory) / "alsace_cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def shm_op() -> None:
    """DeepSpeed's CPU shared-memory all-reduce op, JIT-built once in one process before the
    first ``deepspeed``-launched ranks need it (2 ranks racing to build it take ~45 s)."""
    from _dist_helpers import prebuild_shm_op

    prebuild_shm_op()


# The embedded default, short but real: stage 0 learns the English task (2 epochs), distill
# runs a few optimizer steps. test_e2e checks every output of this run; tests that need a
# trained English model start from its stage 0 (``stage0.init_from``) instead of training one.
E2E_FAST = ["stage0.epochs=2", "distill.max_steps=6", "run.log_every=2", "log.progress=false"]


@pytest.fixture(scope="session")
def xlmr_run(tmp_path_factory, cache) -> tuple[Path, str]:
    """``deepspeed --num_gpus 2 alsace_ds/train.py`` on the embedded default (E2E_FAST, with
    the figures and dev predictions): (run directory, console output). Once per session,
    whatever the number of xdist workers."""
    from _launch import launch

    with once(tmp_path_factory, "xlmr_run") as (folder, done):
        out, log = folder / "xlmr", folder / "stdout.txt"
        if not done:
            res = launch([f"run.output_dir={out}", *E2E_FAST], cache, lean=False,
                         launcher="deepspeed")  # fmt: skip
            assert res.returncode == 0, res.stdout[-6000:]
            log.write_text(res.stdout)
    return out, log.read_text()


@pytest.fixture(scope="session")
def stage0_model(xlmr_run) -> Path:
    """A trained English model of the embedded task (the e2e run's stage 0, the best by dev
    accuracy): ``stage0.enabled=false stage0.init_from=<it>`` starts a run from it."""
    out, _ = xlmr_run
    assert (out / "stage0" / "best" / "config.json").is_file()
    return out / "stage0" / "best"
