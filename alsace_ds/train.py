"""Entry point: ``deepspeed --num_gpus N alsace_ds/train.py [--config FILE] [key=value ...]``.

Thin on purpose: parse the config, validate config and data (before any process group,
model or GPU), initialise distributed, run the recipe (``alsace_ds.recipes.alsace``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alsace_ds.config import ConfigError, config_path, load_config, with_world  # noqa: E402
from alsace_ds.data.corpus import DataError  # noqa: E402
from alsace_ds.engine.checkpoint import CheckpointError  # noqa: E402
from alsace_ds.parallel import LaunchError, PeerError, init_distributed, shutdown  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SILENT_RANK_EXIT_DELAY_S = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ALSACE on DeepSpeed: English fine-tuning, teacher selection, "
        "cross-lingual self-distillation, evaluation.",
    )
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="YAML config file, or a preset name from configs/presets (e.g. xnli-xlmr-large)",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.lr=1e-6")
    return parser.parse_intermixed_args(argv)  # overrides before and after --config


def launcher_world_size() -> int:
    """The world size the launcher announced (deepspeed/torchrun: WORLD_SIZE; mpirun: its own
    variables), read here so that batch arithmetic fails before any process group exists."""
    # Last: the tasks of an srun step (e.g. `srun --mpi=pmix` starting one task per GPU).
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def launcher_rank() -> int:
    """This process's global rank as the launcher announced it (0 when unknown): before the
    process group exists, only rank 0 prints an error, not every rank."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def check_batches(cfg, world: int) -> None:
    from alsace_ds.engine.ds_config import build_ds_config

    for stage in (cfg.stage0, cfg.distill):
        build_ds_config(cfg, stage, world)


SETUP_ERRORS = (ConfigError, DataError, LaunchError, PeerError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """setup -> the recipe (stage0 -> selection -> distill -> evaluate). A problem found in
    setup is one message, printed once, and exit 2: nothing has trained."""
    try:
        cfg, task, ctx, lock = setup(parse_args(argv))
    except SETUP_ERRORS as exc:
        if launcher_rank() == 0:
            print(f"alsace_ds: error: {exc}", file=sys.stderr, flush=True)
        elif not isinstance(exc, PeerError):
            # Silent, and not first out: launchers kill every rank as soon as one exits, and
            # rank 0 (found the same problem) must have printed it by then.
            time.sleep(SILENT_RANK_EXIT_DELAY_S)
        shutdown()
        return 2
    return run(cfg, task, ctx, lock)


def setup(args: argparse.Namespace):
    """Every check that can fail before training, in order: the config, its batch arithmetic
    for the world the launcher announced, the task and its data, the model's config and the
    output directory (all before any process group exists, so each rank finds the same);
    then distributed init with the view groups, the real world, and the run directory."""
    from alsace_ds.data.tasks import check_before_training, prepare_task
    from alsace_ds.recipes.run import open_run_dir

    cfg = load_config(config_path(args.config), args.overrides)
    expected = launcher_world_size()
    cfg = with_world(cfg, expected)
    check_batches(cfg, expected)
    cfg, task = prepare_task(cfg)  # every corpus validated here
    check_before_training(cfg, task)  # model config (max_length), output dir: nothing written
    ctx = init_distributed(cfg.deepspeed.timeout_s, cfg.distill.view_parallel_size)
    if ctx.world_size != expected:
        # e.g. an MPI whose PMI does not match Slurm's: every task would become its own
        # world of 1 and all of them would write the same run directory.
        raise ConfigError(
            [f"the launcher started {expected} processes but they formed a world of "
             f"{ctx.world_size}: rank discovery failed (for srun --mpi, the MPI library "
             "must support Slurm's PMI plugin; torchrun or mpirun avoid it)"],
            "launch",
        )  # fmt: skip
    check_batches(cfg, ctx.world_size)  # the real world, e.g. after MPI discovery
    lock = open_run_dir(cfg, ctx)  # one job per run directory; reuse checked, agreed
    return cfg, task, ctx, lock


def run(cfg, task, ctx, lock) -> int:
    """The stages, with every exit path stopping cleanly: a stop on request exits 75 and
    tells the Slurm script so (``ALSACE_STOP_FILE``); the run-directory lock, the process
    group and this rank's shared-memory buffer are released whatever happens."""
    from alsace_ds.engine import signals
    from alsace_ds.recipes.alsace import run_alsace
    from alsace_ds.tools.shm_cleanup import unlink_own_buffer

    def release() -> None:
        unlink_own_buffer(ctx.rank)  # other ranks' mappings stay valid until they exit
        if lock is not None:
            lock.release()

    signals.install()  # SIGUSR1/SIGTERM: stop at the next agreed poll, commit, exit 75
    signals.watch_launcher(release)  # the launcher dies: stop too, and never outlive it
    try:
        run_alsace(cfg, task, ctx)
    except (signals.Preempted, signals.StopRequested) as stop:
        committed = isinstance(stop, signals.Preempted)
        kept = "checkpoint committed" if committed else "finished work kept"
        if ctx.is_main:
            print(f"alsace_ds: {stop}; {kept}, run again to resume", flush=True)
            signals.write_stop_file(str(stop))
        return signals.EXIT_PREEMPTED
    except (CheckpointError, DataError, PeerError) as exc:  # e.g. a file the weights-only
        if ctx.is_main:  # loader refuses, a cloze view whose mask was truncated away
            print(f"alsace_ds: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()  # the process group is destroyed on every exit path
        release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
