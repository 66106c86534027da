"""The training loop both training stages share, and its commit/stop policy.

:class:`Commits` is the one piece of run state that changes: optimizer steps done in this
invocation (``run.stop_after_steps`` counts over both stages) and rank 0's clock of the last
commit. What a stage commits is one explicit training state in DeepSpeed's client state:
micro-step, completion, a pending dev check, the callback's state, seed and launch facts."""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alsace_ds import parallel
from alsace_ds.config import DistillConfig, Stage0Config
from alsace_ds.engine import checkpoint, signals
from alsace_ds.engine.schedules import lr_sum, warmup_steps
from alsace_ds.engine.trainer import (
    StepPlan,
    current_lr,
    micro_batches,
    progress,
    rank0_state_dict,
    trainable_names,
)
from alsace_ds.method.movement import change_stats, update_bound
from alsace_ds.recipes.callbacks import DevCallback, after_dev
from alsace_ds.recipes.run import Run, launch_facts

SLURM_CHECKPOINT_MINUTES = 30.0
# The ranks agree on a stop request (and rank 0's commit clock) about this often, by rank 0's
# step time: each agreement is an all-reduce read on the host, which on an accelerator drains
# the queue of launched work. Polling every step would cost a pipeline bubble per step.
POLL_SECONDS = 2.0
MAX_POLL_STEPS = 1000
STAGE_TITLES = {"stage0": "stage 0 (English fine-tuning)", "distill": "distill (self-distillation)"}


def checkpoint_minutes(configured: float | None, env: typing.Mapping[str, str]) -> float:
    """``run.checkpoint_minutes``; null: periodic commits inside a Slurm job, none elsewhere."""
    if configured is not None:
        return configured
    return SLURM_CHECKPOINT_MINUTES if "SLURM_JOB_ID" in env else 0.0


@dataclass
class Commits:
    """When a training stage commits a checkpoint, and when the run stops."""

    run: Run
    steps_done: int = 0  # optimizer steps in this invocation, over both stages
    last_commit: float = dataclasses.field(default_factory=time.monotonic)  # rank 0's clock
    next_poll: int = 1  # steps_done at which the ranks next agree (the same on every rank)
    polled: tuple[int, float] = (0, 0.0)  # (steps_done, rank 0's clock) at the last poll

    def folder(self, stage: str) -> Path:
        return self.run.run_dir / "checkpoints" / stage

    def save(
        self, stage: str, engine: Any, micro: int, complete: bool,
        on_dev: DevCallback | None = None, pending_dev: bool = False,
    ) -> None:  # fmt: skip
        """Commit the stage's training state with DeepSpeed's checkpoint (collective)."""
        run = self.run
        state = {
            "stage": stage,
            "micro": micro,
            "complete": complete,
            "pending_dev": pending_dev,  # a dev check that a stop interrupted, redone first
            "callback": on_dev.state() if on_dev is not None else None,
            "seed": run.cfg.run.seed,
            "launch": launch_facts(run.cfg, stage, run.ctx.world_size),
        }
        tag = f"step{engine.global_steps}"
        checkpoint.commit(engine, self.folder(stage), tag, run.ctx, state,
                          keep=run.cfg.run.keep_checkpoints)  # fmt: skip
        if run.ctx.is_main:
            self.last_commit = time.monotonic()

    def start_stage(self) -> None:
        """A stage's steps take their own time: poll after its first step, then at the
        cadence its step time gives."""
        self.next_poll = self.steps_done + 1
        self.polled = (self.steps_done, time.monotonic())

    def poll(self) -> tuple[bool, bool]:
        """(a stop was requested on some rank, rank 0's commit clock is due), agreed by every
        rank, which also agree on the next poll: ``POLL_SECONDS`` of rank 0's steps later."""
        rc, ctx = self.run.cfg.run, self.run.ctx
        now = time.monotonic()
        minutes = checkpoint_minutes(rc.checkpoint_minutes, os.environ)
        due = bool(minutes) and ctx.is_main and now - self.last_commit >= 60 * minutes
        every = 0
        if ctx.is_main:
            per_step = (now - self.polled[1]) / max(1, self.steps_done - self.polled[0])
            every = max(1, min(MAX_POLL_STEPS, int(POLL_SECONDS / max(per_step, 1e-9))))
        stop, due, every = parallel.all_max([int(signals.requested()), int(due), every], ctx)
        self.next_poll = self.steps_done + every
        self.polled = (self.steps_done, now)
        return bool(stop), bool(due)

    def boundary(
        self, stage: str, engine: Any, micro: int, last: bool, on_dev: DevCallback | None,
        dev_due: bool = False,
    ) -> None:  # fmt: skip
        """After an optimizer step: periodic checkpoint (every ``run.checkpoint_every`` steps
        or ``run.checkpoint_minutes`` by rank 0's clock); a stop that every rank agrees on (a
        request seen by any rank at the last :meth:`poll`, or ``run.stop_after_steps``, which
        every rank counts alike) commits and raises ``Preempted``. The stage's last step
        only counts: its caller commits the completed checkpoint, and a stop asked for then
        takes effect at the next poll. ``dev_due``: a dev check follows this step; a stop
        here commits it as pending (redone first)."""
        self.steps_done += 1
        if last:
            return
        rc = self.run.cfg.run
        counted = rc.stop_after_steps is not None and self.steps_done >= rc.stop_after_steps
        asked, due = self.poll() if self.steps_done >= self.next_poll else (False, False)
        stop, every = counted or asked, rc.checkpoint_every
        if stop or due or (every and engine.global_steps % every == 0):
            pending = stop and dev_due  # a periodic commit is followed by its check right here
            self.save(stage, engine, micro, False, on_dev=on_dev, pending_dev=pending)
        if stop:
            why = signals.reason() if asked else "run.stop_after_steps"
            at = f"optimizer step {engine.global_steps}"
            raise signals.Preempted(f"{stage} stopped at {at} ({why})")

    def resume(self, stage: str, engine: Any, on_dev: DevCallback | None = None) -> dict:
        """Load the stage's committed checkpoint into ``engine`` (``run.resume: auto``; the
        run directory was checked at start) and restore ``on_dev``'s state from it."""
        run = self.run
        folder = self.folder(stage)
        auto = run.cfg.run.resume == "auto"
        tag = parallel.decide(lambda: checkpoint.read_latest(folder), run.ctx) if auto else None
        if tag is None:
            return {"micro": 0, "complete": False}
        state = checkpoint.load(engine, folder, tag, run.ctx)
        if on_dev is not None and state.get("callback") is not None:
            on_dev.restore(state["callback"])
        run.say(f"{stage}: resumed from checkpoint {tag} (micro-step {state['micro']})")
        return state


@dataclass(frozen=True)
class StageRun:
    """One training stage's fixed facts: what the loop runs and on which data shard."""

    name: str  # "stage0" | "distill"
    st: Stage0Config | DistillConfig
    plan: StepPlan
    n: int  # examples the stage draws batches from
    shard: tuple[int, int]  # (data-parallel rank, world): stage 0 all ranks, distill groups
    seed: int  # batch order
    step: Callable[[list[int]], torch.Tensor]  # forward/backward/step of one micro-batch
    roles: tuple[list[str], list[str]] | None = None  # (teachers, students) for dev curves


def train_loop(
    run: Run, commits: Commits, stage: StageRun, engine: Any, tok: Any, point: dict,
    on_dev: DevCallback | None = None,
) -> bool:  # fmt: skip
    """The micro-step loop: dev checks at epoch ends (or every ``st.eval_every`` optimizer
    steps where the stage has it), mean loss every ``run.log_every`` steps, commit/stop
    decisions at optimizer-step boundaries. ``point`` (:meth:`Commits.resume`) resumes
    mid-stage, first redoing a dev check that a stop interrupted. ``on_dev`` sees each dev
    check and returns True to end the stage early (the same on every rank: its inputs are
    all-reduced). Returns whether the stage ended early."""
    name, st, plan = stage.name, stage.st, stage.plan
    start = point["micro"]
    commits.start_stage()
    engine.train()
    bar = progress(plan.total_micro, name, run.ctx, run.cfg.log.progress)
    bar.update(start)
    losses: list[torch.Tensor] = []
    # A stop inside a dev check commits the step before it with the check pending: redone
    # first here, it counts as the check of micro-step `start`, so that neither the epoch
    # boundary at `start` nor the stage's end (start == total) checks a second time.
    pending = bool(point.get("pending_dev", False))
    last_epoch = (
        start // plan.micro_per_epoch if pending else max(start - 1, 0) // plan.micro_per_epoch
    )
    batches = micro_batches(stage.n, st.micro_batch, *stage.shard, stage.seed, plan, start)
    every = getattr(st, "eval_every", 0)  # > 0: checks every `every` steps, not at epoch ends

    def check(micro: int) -> bool:
        """A dev check; a stop inside it commits the step before it (check redone on resume)."""
        try:
            return after_dev(run, engine, tok, name, stage.roles, on_dev)
        except signals.StopRequested as stop:
            commits.save(name, engine, micro, complete=False, on_dev=on_dev, pending_dev=True)
            raise signals.Preempted(
                f"{name}: {stop} at optimizer step {engine.global_steps}"
            ) from None

    stopped = pending and check(start)
    for micro, epoch, batch in [] if stopped else batches:
        if epoch != last_epoch:
            last_epoch = epoch
            if not every and check(micro):
                stopped = True
                break
        losses.append(stage.step(batch))
        bar.update(1)
        if (micro + 1) % (st.grad_accum * run.cfg.run.log_every) == 0:
            log_train(run, name, engine, losses, bar)
        if (micro + 1) % st.grad_accum == 0:
            last = micro + 1 == plan.total_micro
            due = bool(every) and engine.global_steps % every == 0 and not last
            commits.boundary(name, engine, micro + 1, last, on_dev, dev_due=due)
            if due and check(micro + 1):
                stopped = True
                break
    if losses:
        log_train(run, name, engine, losses, bar)
    bar.close()
    if not stopped and not (pending and start == plan.total_micro):
        check(plan.total_micro)
    engine.train()
    return stopped


def log_train(run: Run, stage: str, engine: Any, losses: list[torch.Tensor], bar: Any) -> None:
    """Mean loss since the last log, averaged over ranks (a collective at the same micro-step
    on every rank), to TensorBoard and the progress bar."""
    local = torch.stack([x.float().cpu() for x in losses]).mean().to(torch.float64)
    loss = float(parallel.all_reduce_sum(local, run.ctx)) / run.ctx.world_size
    step = engine.global_steps
    run.tb.scalar(f"{stage}/train/loss", loss, step)
    run.tb.scalar(f"{stage}/train/lr", current_lr(engine), step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{current_lr(engine):.2e}")
    losses.clear()


@dataclass
class Movement:
    """A training stage's start weights (rank 0's CPU copy of the trainable ones), how far
    its schedule can move them (:func:`alsace_ds.method.movement.update_bound`, rank 0) and,
    at the end, how far they moved (:meth:`report`). A stage that cannot change the model is
    warned about before it runs; TensorBoard ``<stage>/params/...`` and the report hold the
    figures."""

    run: Run
    stage: str  # "stage0" | "distill"
    most: float  # the sum of the stage's learning rates: Adam's largest move of one weight
    start: dict[str, torch.Tensor] | None
    bound: dict | None

    @classmethod
    def take(cls, run: Run, stage: str, engine: Any, st: Any, total: int) -> Movement:
        start = rank0_state_dict(engine, run.ctx, trainable_names(engine))  # ZeRO-3: collective
        warm = warmup_steps(total, st.warmup_ratio)
        most = lr_sum(st.schedule, total, warm, st.lr)
        bound = None
        if run.ctx.is_main:
            bound = update_bound(start, most, run.cfg.model.resolved_dtype)
            bound.update(steps=total, peak_lr=st.lr, schedule=st.schedule, warmup_steps=warm)
        return cls(run, stage, most, start, bound)

    def warn_if_stuck(self) -> None:
        b = self.bound
        if b is None:
            return
        self.run.tb.scalar(f"{self.stage}/params/update_bound", b["bound"], 0)
        self.run.tb.scalar(f"{self.stage}/params/relative_update_bound", b["relative_bound"], 0)
        if b["cannot_change"]:
            self.run.say(
                f"WARNING: {STAGE_TITLES[self.stage]} cannot change the model: "
                f"{b['cannot_change']}. Raise {self.stage}.lr or {self.stage}.epochs (the "
                "presets' distill schedules reproduce the paper's total update: README, "
                "'Distill schedule')."
            )

    def report(self, end: dict[str, torch.Tensor] | None, step: int) -> dict | None:
        """Compare the exported end weights (rank 0) with the start; None on other ranks."""
        if not self.run.ctx.is_main:
            return None
        stats = change_stats(self.start, end, self.run.cfg.model.resolved_dtype)
        stats["bound"] = self.bound
        for key in ("relative_change", "changed_share", "changed_share_compute", "max_abs_change"):
            self.run.tb.scalar(f"{self.stage}/params/{key}", stats[key], step)
        self.run.say(
            f"{STAGE_TITLES[self.stage]} moved the weights by ||delta||/||theta|| = "
            f"{stats['relative_change']:.3g} (max |delta| {stats['max_abs_change']:.3g}); "
            f"{100 * stats['changed_share']:.2f}% of them changed"
        )
        self.start = None  # free the CPU copy
        return stats
