"""The run directory: who may use it, and whether its earlier outputs fit this config.

Before any model is loaded (rank 0 reads, every rank gets the verdict):

* one job at a time (:class:`RunLock`): rank 0 holds an ``flock`` on ``.lock`` for the whole
  job; a rerun whose predecessor's ranks are still committing their stop checkpoint waits
  for them, then goes on;
* every reuse of an earlier output is checked against the config that made it
  (:func:`check_reuse`): the run directory's ``config.yaml`` for its checkpoints and cached
  results, each exported stage-0 model's own ``alsace_config.json``; a checkpoint that would
  be loaded must have been written by the same world size, ZeRO stage and view layout (its
  ZeRO partitions are per rank); a broken ``latest`` is named. Any problem refuses the run
  with every reason at once, and nothing is deleted or rewritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from alsace_ds import parallel
from alsace_ds.config import Config, ConfigError
from alsace_ds.engine import checkpoint

#: Config sections whose change makes the run directory's outputs meaningless for this run.
RESUME_SECTIONS = ("task", "model", "stage0", "selection", "distill", "eval")
#: Keys that may change between attempts (they do not change what is computed).
FREE_KEYS = {
    "eval.batch_size",
    "selection.batch_size",
    "deepspeed.timeout_s",
    "eval.dev_predictions",
}  # (an output more or less, nothing trained differently)
#: Keys that follow from the world size (reported as the world-size problem instead).
WORLD_KEYS = ("micro_batch", "grad_accum", "view_parallel_size")
STAGES = ("stage0", "distill")
PROVENANCE = "alsace_config.json"  # inside an exported stage-0 model folder
#: Entries whose presence means the directory holds outputs of an earlier run.
OUTPUTS = ("config.yaml", "checkpoints", "stage0", "selection.json", "results", "final",
           "report.json")  # fmt: skip
LOCK_WAIT_S = float(os.environ.get("ALSACE_LOCK_WAIT_S", "120"))


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]  # fmt: skip
    return [] if old == new else [(prefix[:-1], old, new)]


def _relevant(conf: dict, sections: tuple[str, ...]) -> dict:
    out = {s: conf.get(s) for s in sections}
    out["run.seed"] = (conf.get("run") or {}).get("seed")
    ds = dict(conf.get("deepspeed") or {})
    ds.pop("timeout_s", None)
    out["deepspeed"] = ds
    return out


def config_diffs(saved: dict, now: dict, sections=RESUME_SECTIONS, world_changed=False) -> list:
    diffs = _diff(_relevant(saved, sections), _relevant(now, sections))
    diffs = [d for d in diffs if d[0] not in FREE_KEYS]
    if world_changed:
        diffs = [d for d in diffs if d[0].rsplit(".", 1)[-1] not in WORLD_KEYS]
    return diffs


def launch_facts(world_size: int, view_size: int, zero_stage: int) -> dict:
    return {"world_size": world_size, "view_size": view_size, "zero_stage": zero_stage}


def stage0_exported(run_dir: Path) -> bool:
    return (run_dir / "stage0" / "model" / "config.json").is_file()


def loaded_stages(run_dir: Path) -> list[str]:
    """The stages whose checkpoint a rerun loads (stage 0's only while it is not exported)."""
    return [s for s in STAGES if s != "stage0" or not stage0_exported(run_dir)]


def _checkpoint_problems(run_dir: Path, stage: str, facts: dict) -> list[str]:
    folder = run_dir / "checkpoints" / stage
    try:
        tag = checkpoint.read_latest(folder)
    except checkpoint.CheckpointError as exc:
        return [str(exc)]
    if tag is None:
        return []
    then = checkpoint.record(folder, tag).get("launch", {})
    if then.get("world_size") not in (None, facts["world_size"]):
        return [
            f"{folder / tag} was written by {then['world_size']} rank(s) and this job has "
            f"{facts['world_size']}: ZeRO keeps optimizer state per rank, so resume it with "
            f"{then['world_size']} rank(s), or start another run.output_dir "
            f"(stage0.init_from can start it from {run_dir / 'stage0' / 'model'} when that exists)"
        ]
    problems = []
    for key, what in (("zero_stage", "ZeRO stage"), ("view_size", "view-parallel size")):
        if then.get(key) not in (None, facts[key]):
            problems.append(
                f"{folder / tag} was written with {what} {then[key]}, this job uses "
                f"{facts[key]}: resume with the same one, or use another run.output_dir"
            )
    return problems


def _provenance_problems(run_dir: Path, now: dict) -> list[str]:
    """Exported stage-0 models (``stage0/model``, ``stage0/best``) a rerun would start from."""
    problems = []
    for model in (run_dir / "stage0" / "model", run_dir / "stage0" / "best"):
        if not (model / "config.json").is_file():
            continue
        info = model / PROVENANCE
        if not info.is_file():
            problems.append(f"{model} has no {PROVENANCE}: which config made it is unknown, so "
                            "it is not reused; remove it to retrain stage 0, or use another "
                            "run.output_dir")  # fmt: skip
            continue
        made = json.loads(info.read_text())
        problems += [
            f"{model} was made with {k} = {old!r}, this run has {new!r}: stage 0 would not be "
            "redone; use another run.output_dir (or remove that folder to retrain stage 0)"
            for k, old, new in config_diffs(made, now, ("task", "model", "stage0"))
        ]
    return problems


def _saved_config(path: Path, found: str) -> dict | str:
    """The run directory's ``config.yaml`` as a mapping, or the problem with it."""
    try:
        saved = yaml.safe_load(path.read_text())
        why = "is empty" if saved is None else "does not hold a config mapping"
    except OSError as exc:
        why = f"cannot be read ({exc.strerror or exc})"
        saved = None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = f"is not valid YAML ({getattr(exc, 'problem', None) or 'unreadable'}{where})"
        saved = None
    if isinstance(saved, dict) and saved:
        return saved
    return (f"run.output_dir: {path} {why}; it records the config that made the outputs there "
            f"({found}), so they cannot be checked against this run: restore it, or use another "
            "run.output_dir")  # fmt: skip


def reuse_problems(cfg: Config, facts: dict[str, dict]) -> list[str]:
    """Every reason this run must not continue ``cfg.run.output_dir`` (rank 0 reads files).
    ``facts[stage]`` are the launch facts each stage would run with."""
    run_dir = Path(cfg.run.output_dir)
    if not any((run_dir / name).exists() for name in OUTPUTS):
        return []
    found = ", ".join(name for name in OUTPUTS if (run_dir / name).exists())
    if cfg.run.resume == "never":
        return [f"run.output_dir: {run_dir} already holds outputs ({found}); use "
                "run.resume=auto to continue it, or another output_dir"]  # fmt: skip
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return [f"run.output_dir: {run_dir} holds outputs ({found}) but no config.yaml, so "
                "the config that made them is unknown; use another output_dir"]  # fmt: skip
    saved = _saved_config(saved_path, found)
    if isinstance(saved, str):
        return [saved]
    now = cfg.to_dict()
    problems = []
    for stage in loaded_stages(run_dir):
        problems += _checkpoint_problems(run_dir, stage, facts[stage])
    world_changed = any("rank(s) and this job has" in p for p in problems)
    problems += [
        f"cannot continue {run_dir} with a different setup ({k}: {old!r} in the run "
        f"directory, {new!r} now); use another run.output_dir"
        for k, old, new in config_diffs(saved, now, world_changed=world_changed)
    ]
    return problems + _provenance_problems(run_dir, now)


def check_reuse(cfg: Config, facts: dict[str, dict], ctx: parallel.ParallelContext) -> None:
    """:func:`reuse_problems` decided on rank 0; raises ``ConfigError`` (rank 0) or
    ``PeerError`` (the others) before any model is loaded."""

    def read() -> None:
        problems = reuse_problems(cfg, facts)
        if problems:
            raise ConfigError(problems, "run.output_dir")

    parallel.decide(read, ctx)


def write_provenance(folder: Path, cfg: Config) -> None:
    """Record beside an exported model the config that made it (inside the atomic export)."""
    (folder / PROVENANCE).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")


# ----------------------------------------------------------------------------- results cache


def results_dir(run_dir: Path) -> Path:
    return run_dir / "results"


def load_result(run_dir: Path, name: str, ctx: parallel.ParallelContext) -> Any:
    """A finished piece of work saved by :func:`save_result`, or None (rank 0 reads)."""
    path = results_dir(run_dir) / f"{name}.json"
    return parallel.decide(lambda: json.loads(path.read_text()) if path.is_file() else None, ctx)


def save_result(run_dir: Path, name: str, value: Any, ctx: parallel.ParallelContext) -> None:
    from alsace_ds.io import atomic_write_json

    if ctx.is_main:
        atomic_write_json(results_dir(run_dir) / f"{name}.json", value)
    parallel.barrier(ctx)


# ----------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, held by rank 0 for the whole job."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self, wait_s: float = LOCK_WAIT_S, say=print) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ConfigError(
                        [f"run.output_dir: {self.path.parent} is in use by another job "
                         f"({holder}) for more than {wait_s:g} s; wait for it to end, or use "
                         "another output_dir"], "run.output_dir") from None  # fmt: skip
                if not told:
                    say(f"waiting (at most {wait_s:g} s) for the job that still holds "
                        f"{self.path.parent} ({holder}) to commit and exit")  # fmt: skip
                    told = True
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
