"""Checkpoints a resumed job can trust: committed atomically, verified, loaded without pickle.

Layout of a stage's folder ``checkpoints/<stage>/``::

    step<N>/                 DeepSpeed's files (+ rng_rank<r>.pt, + manifest.json last)
    latest                   the committed tag, replaced atomically after the manifest

A commit (:func:`commit`) writes DeepSpeed's checkpoint with the explicit training state in
its client state (``{"alsace": state}``: micro-step, completion, the stage's best-model record
and collapse-guard state, the launch facts), every rank's RNG states, then a manifest of
every file's size and SHA-256 (hashed in parallel, a share per rank) and only then ``latest``.
A crash at any point leaves the previous commit in force. A resume reads ``latest``
(:func:`read_latest`: a missing tag or a broken file is an error that names it, and nothing
is deleted), verifies the files against the manifest at start-up (:func:`verify`) and loads
them with ``torch.load(weights_only=True)`` and an allowlist of the DeepSpeed classes their
state holds (:func:`load`): a pickle planted in a run directory is refused, never run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alsace_ds import parallel
from alsace_ds.io import atomic_write_json, atomic_write_text, sha256_file

MANIFEST = "manifest.json"
TAG = re.compile(r"step(\d+)")
STATE_KEY = "alsace"  # the training state's key in DeepSpeed's client state


class CheckpointError(RuntimeError):
    """A run directory's checkpoint cannot be used as it is; the message names the file."""


def tag_step(tag: str) -> int:
    m = TAG.fullmatch(tag)
    return int(m.group(1)) if m else -1


# ----------------------------------------------------------------------------- RNG


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank random streams (dropout masks differ across data-parallel ranks); CPU,
    accelerator and Python's ``random`` together."""
    from deepspeed.accelerator import get_accelerator

    value = seed + 100_003 * rank
    random.seed(value)
    torch.manual_seed(value)  # also seeds CUDA's generators
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.manual_seed_all(value)


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {
        "cpu": torch.get_rng_state(),
        "accelerator": None if acc.device_name() == "cpu" else acc.get_rng_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["cpu"])
    if state.get("accelerator") is not None:
        get_accelerator().set_rng_state(state["accelerator"])
    random.setstate(state["python"])


# ----------------------------------------------------------------------------- loading


def _allowlist() -> list[Any]:
    """The classes (besides tensors, containers and numbers) inside DeepSpeed's ZeRO 0-3
    checkpoint files, found with ``torch.serialization.get_unsafe_globals_in_checkpoint``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` without arbitrary unpickling: tensors, containers, numbers and the
    allowlisted DeepSpeed classes only."""
    import pickle

    try:
        with torch.serialization.safe_globals(_allowlist()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message: boilerplate, then "WeightsUnpickler error:", then what it met
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        first = detail[0].split(" was not an allowed")[0].strip() if detail else "?"
        raise CheckpointError(
            f"{path}: refused to load: it holds objects a DeepSpeed checkpoint never contains "
            f"({first}); the file was not written by this program"
        ) from None


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _my_share(names: list[str], ctx: parallel.ParallelContext) -> list[str]:
    return names[ctx.rank :: ctx.world_size]


def commit(
    engine: Any, ckpt_dir: Path, tag: str, ctx: parallel.ParallelContext, state: dict, keep: int = 0
) -> None:
    """Write and commit checkpoint ``tag`` (collective: every rank calls it)."""
    folder = ckpt_dir / tag
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={STATE_KEY: state}, save_latest=False
    )
    rng = folder / f"rng_rank{ctx.rank}.pt"
    torch.save(rng_state(), rng.with_suffix(".tmp"))
    os.replace(rng.with_suffix(".tmp"), rng)
    parallel.barrier(ctx)
    names = parallel.decide(lambda: _files(folder), ctx)
    mine = {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
            for n in _my_share(names, ctx)}  # fmt: skip
    shares = parallel.all_gather_object(mine, ctx)
    if ctx.is_main:
        files = {k: v for share in shares for k, v in share.items()}
        record = {k: state[k] for k in ("stage", "micro", "complete", "launch") if k in state}
        atomic_write_json(folder / MANIFEST, {"tag": tag, "record": record, "files": files})
        atomic_write_text(ckpt_dir / "latest", tag)
        if keep > 0:
            prune(ckpt_dir, tag, keep)
    parallel.barrier(ctx)


def prune(ckpt_dir: Path, committed: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` tags up to the committed one; a tag newer than it
    (a run directory mended by hand) is never deleted."""
    step = tag_step(committed)
    older = sorted(
        (p.name for p in ckpt_dir.iterdir() if p.is_dir() and 0 <= tag_step(p.name) <= step),
        key=tag_step,
    )
    gone = [t for t in older[:-keep] if t != committed]
    for name in gone:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    return gone


def read_latest(ckpt_dir: Path) -> str | None:
    """The committed tag; None when the stage never committed one (no ``latest``)."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    raw = latest.read_bytes()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if tag is None or tag_step(tag) < 0:
        raise CheckpointError(
            f"{latest}: not a checkpoint tag ({raw[:40]!r}); it should name a folder such as "
            "step120 beside it. Write the newest good tag into it, or use another "
            "run.output_dir; nothing was deleted"
        )
    if not (ckpt_dir / tag / MANIFEST).is_file():
        what = "does not exist" if not (ckpt_dir / tag).is_dir() else f"has no {MANIFEST}"
        others = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir()), key=tag_step)
        raise CheckpointError(
            f"{latest} names {tag!r}, which {what} (tags here: {', '.join(others) or 'none'}); "
            "write a committed tag into it, or use another run.output_dir; nothing was deleted"
        )
    return tag


def record(ckpt_dir: Path, tag: str) -> dict:
    """The commit's record (stage, micro-step, completion, launch facts), no torch needed."""
    return json.loads((ckpt_dir / tag / MANIFEST).read_text())["record"]


def verify(ckpt_dir: Path, tag: str, ctx: parallel.ParallelContext) -> None:
    """Every file of the tag against the manifest (size, SHA-256; a share per rank); raises
    :class:`CheckpointError` naming each bad file, on every rank."""
    folder = ckpt_dir / tag

    def listing() -> tuple[dict, list[str]]:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        extra = [f"{folder / n}: not part of the commit" for n in _files(folder) if n not in files]
        return files, extra

    files, problems = parallel.decide(listing, ctx)
    for name in _my_share(sorted(files), ctx):
        path, want = folder / name, files[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            size = path.stat().st_size
            problems.append(f"{path}: {size} bytes, the commit wrote {want['bytes']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path}: contents differ from the commit (SHA-256)")
    found = sorted({p for share in parallel.all_gather_object(problems, ctx) for p in share})
    if found:
        raise CheckpointError(
            "checkpoint " + str(folder) + " is damaged: " + "; ".join(found)
            + ". Restore the files, or point latest at an older intact tag"
        )  # fmt: skip


def load(engine: Any, ckpt_dir: Path, tag: str, ctx: parallel.ParallelContext) -> dict:
    """Restore module, optimizer, scheduler and this rank's RNG (no pickle); returns the
    training state committed with the tag. The files were checked by :func:`verify` at
    start-up (``pipeline.open_run_dir`` verifies every checkpoint a run will load), not
    hashed a second time here."""
    ce = engine.checkpoint_engine
    ce.load = _safe_loader(ce.load)
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None or STATE_KEY not in client:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed loaded no training state")
    rng = ckpt_dir / tag / f"rng_rank{ctx.rank}.pt"
    set_rng_state(safe_load(rng))
    return client[STATE_KEY]


def _safe_loader(original: Callable) -> Callable:
    if getattr(original, "alsace_safe", False):
        return original

    def load(path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)

    load.alsace_safe = True
    return load
