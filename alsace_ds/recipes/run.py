"""What every stage of a recipe reads, fixed for the whole run: the config, the task, the
parallel context (its view groups built once, at start-up), the run directory and the
TensorBoard writer. The one piece of run state that changes, when to commit and stop, is
:class:`alsace_ds.recipes.loop.Commits`, handed to the training stages explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alsace_ds import parallel
from alsace_ds.config import Config, DistillConfig, Stage0Config
from alsace_ds.data.tasks import TaskData
from alsace_ds.engine import checkpoint, rundir
from alsace_ds.engine.ds_config import build_ds_config
from alsace_ds.engine.schedules import warmup_steps
from alsace_ds.engine.trainer import build_engine, load_for_stage
from alsace_ds.reporting.tb import TBLogger


@dataclass(frozen=True)
class Run:
    cfg: Config
    task: TaskData
    ctx: parallel.ParallelContext
    run_dir: Path
    tb: TBLogger

    def say(self, msg: str) -> None:
        if self.ctx.is_main:
            print(f"[alsace_ds] {msg}", flush=True)


def stage_config(cfg: Config, stage: str) -> Stage0Config | DistillConfig:
    return cfg.stage0 if stage == "stage0" else cfg.distill


def launch_facts(cfg: Config, stage: str, world_size: int) -> dict:
    """The launch a stage's checkpoint is only valid for (ZeRO keeps state per rank)."""
    zero = int(
        build_ds_config(cfg, stage_config(cfg, stage), world_size)["zero_optimization"]["stage"]
    )
    view = 1 if stage == "stage0" else int(cfg.distill.view_parallel_size)
    return rundir.launch_facts(world_size, view, zero)


def make_engine(run: Run, stage: str, source: str, total: int) -> tuple[Any, Any, list[str]]:
    """The stage's ZeRO engine around the model at ``source`` (a Hub name or a folder) with
    the stage's optimizer and ``total``-step schedule: (engine, tokenizer, load warnings)."""
    cfg, task = run.cfg, run.task
    st = stage_config(cfg, stage)
    ds_cfg = build_ds_config(cfg, st, run.ctx.world_size)
    scorer, tok, warnings = load_for_stage(
        cfg.model.family, source, task.num_labels, task.label_words, cfg.model.dropout,
        ds_cfg, head=task.head, languages=task.prompt_languages,
        freeze_embeddings=cfg.model.freeze_embeddings,
    )  # fmt: skip
    warm = warmup_steps(total, st.warmup_ratio)
    engine = build_engine(scorer, ds_cfg, st.lr, st.weight_decay, total, warm, st.schedule)
    return engine, tok, warnings


def open_run_dir(cfg: Config, ctx: parallel.ParallelContext) -> rundir.RunLock | None:
    """Before any model is loaded: take the run directory (rank 0 holds its lock for the
    job) and refuse, with every reason, to reuse outputs another setup made."""
    lock = rundir.RunLock(Path(cfg.run.output_dir)) if ctx.is_main else None
    parallel.decide(lambda: lock.acquire(say=lambda m: print(f"[alsace_ds] {m}", flush=True)), ctx)
    facts = {stage: launch_facts(cfg, stage, ctx.world_size) for stage in rundir.STAGES}
    try:
        rundir.check_reuse(cfg, facts, ctx)
        for stage in rundir.loaded_stages(Path(cfg.run.output_dir)):  # shards intact, by name
            folder = Path(cfg.run.output_dir) / "checkpoints" / stage
            tag = parallel.decide(lambda f=folder: checkpoint.read_latest(f), ctx)
            if tag is not None:
                checkpoint.verify(folder, tag, ctx)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
