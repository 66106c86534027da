"""The ALSACE stages on DeepSpeed: English fine-tuning -> teacher selection ->
cross-lingual self-distillation -> evaluation before and after.

Outputs, all under ``run.output_dir`` and written atomically:
``config.yaml`` (resolved), ``selection.json``, ``report.json`` / ``report.md``,
``checkpoints/<stage>/`` (DeepSpeed), ``stage0/model`` and ``final/model`` (plain Hugging
Face folders) and ``tb/`` (TensorBoard events).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from alsace_ds import parallel
from alsace_ds.config import Config, DistillConfig, Stage0Config
from alsace_ds.data.corpus import ParallelCorpus, View
from alsace_ds.data.tasks import TaskData
from alsace_ds.engine import checkpoint, rundir, signals
from alsace_ds.engine.ds_config import build_ds_config
from alsace_ds.engine.schedules import authors_update, lr_sum, warmup_steps
from alsace_ds.engine.trainer import (
    StepPlan,
    build_engine,
    cross_entropy_step,
    current_lr,
    export_hf,
    forward_views,
    load_for_stage,
    micro_batches,
    plan_steps,
    predict_probs,
    progress,
    rank0_state_dict,
    release_engine,
    trainable_names,
)
from alsace_ds.io import atomic_write_json, atomic_write_text
from alsace_ds.method.guard import Guard, monitor_metrics, monitor_sums
from alsace_ds.method.metrics import accuracy_counts, markdown_table, summarize
from alsace_ds.method.movement import change_stats, update_bound
from alsace_ds.method.pairs import pair_kl_loss
from alsace_ds.method.selection import most_confident, select_from_views
from alsace_ds.reporting.tables import states_of, table2, table3, to_csv, to_markdown
from alsace_ds.reporting.tb import TBLogger


@dataclass
class Run:
    """What every stage needs: config, data, distributed context, output places."""

    cfg: Config
    task: TaskData
    ctx: parallel.ParallelContext
    run_dir: Path
    tb: TBLogger
    steps_done: int = 0  # optimizer steps in this invocation, over both stages
    last_commit: float = dataclasses.field(default_factory=time.monotonic)  # rank 0's clock

    def say(self, msg: str) -> None:
        if self.ctx.is_main:
            print(f"[alsace_ds] {msg}", flush=True)


# ----------------------------------------------------------------------------- views / eval


def parallel_views(corpus: ParallelCorpus, languages: list[str]) -> list[View]:
    """Example-major flattening: view ``v`` is example ``v // T`` in language ``v % T``."""
    return [ex.views[lang] for ex in corpus.examples for lang in languages]


def evaluate(run: Run, engine: Any, tokenizer: Any, corpus: ParallelCorpus, desc: str) -> dict:
    """Reduced per-language sums (correct, count, prediction histogram) over all ranks."""
    return count_stats(run, corpus, *predict_corpus(run, engine, tokenizer, corpus, desc))


def count_stats(run: Run, corpus: ParallelCorpus, idx: torch.Tensor, probs: torch.Tensor) -> dict:
    T = len(run.task.languages)
    labels = corpus.labels()[idx // T]
    stats = accuracy_counts(probs.argmax(-1), labels, idx % T, T, run.task.num_labels)
    return {k: parallel.all_reduce_sum(v, run.ctx) for k, v in stats.items()}


def predict_corpus(
    run: Run, engine: Any, tokenizer: Any, corpus: ParallelCorpus, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (view index ``[V]``, probabilities ``[V, C]``) over the corpus's views
    (example-major: view v is example v // T in language v % T)."""
    views = parallel_views(corpus, run.task.languages)
    return predict_probs(
        engine,
        tokenizer,
        views,
        run.ctx,
        run.cfg.eval.batch_size,
        run.cfg.model.max_length,
        desc,
        run.cfg.log.progress,
        view_langs(run, len(views)),
    )


def view_langs(run: Run, num_views: int) -> list[int] | None:
    """Label-word table row of each example-major view (languages come first in
    ``prompt_languages``, so view v's row is ``v % T``); None for the classification head."""
    if run.task.label_words is None:
        return None
    T = len(run.task.languages)
    return [v % T for v in range(num_views)]


def summary(run: Run, stats: dict, teachers: list[str], students: list[str]) -> dict:
    return summarize(
        run.task.languages,
        stats["correct"],
        stats["count"],
        run.task.english,
        teachers,
        students,
        stats["pred_hist"],
    )


def log_summary(run: Run, prefix: str, summ: dict, step: int) -> None:
    run.tb.scalars(f"{prefix}/accuracy", summ["accuracy"], step)
    gaps = {k: v for k, v in summ["gap"].items() if k != run.task.english and v is not None}
    if gaps:
        run.tb.scalars(f"{prefix}/gap", gaps, step)
    for group, avg in summ["averages"].items():
        if avg["accuracy"] is not None:
            run.tb.scalar(f"{prefix}/avg_accuracy/{group}", avg["accuracy"], step)
        if avg["gap"] is not None:
            run.tb.scalar(f"{prefix}/avg_gap/{group}", avg["gap"], step)


@dataclass
class DevResult:
    summ: dict  # accuracies etc. (all-reduced)
    idx: torch.Tensor  # this rank's view indices [V]
    probs: torch.Tensor  # [V, C]


def dev_check(
    run: Run, engine: Any, tok: Any, stage: str, step: int, roles=None
) -> DevResult | None:
    """Per-language dev accuracy during training, logged as curves. Decisions (best stage-0
    model, the stage-2 guard) use English dev accuracy only: no target-language labels."""
    if run.task.dev is None or not run.cfg.eval.every_epoch:
        return None
    idx, probs = predict_corpus(run, engine, tok, run.task.dev, f"{stage} dev")
    stats = count_stats(run, run.task.dev, idx, probs)
    teachers, students = roles or (run.task.languages, [])
    summ = summary(run, stats, teachers, students)
    log_summary(run, f"{stage}/dev", summ, step)
    avg = summ["averages"]["all"]
    en = run.task.english
    head = f"{en}={summ['accuracy'][en]:.2f} " if en else ""
    gap = f" avg gap={avg['gap']:.2f}" if avg["gap"] is not None else ""
    run.say(f"{stage} step {step}: dev acc {head}avg={avg['accuracy']:.2f}{gap}")
    return DevResult(summ, idx, probs)


# ----------------------------------------------------------------------------- stage 0


def run_stage0(run: Run) -> str:
    """English fine-tuning; returns the exported model folder that distill starts from."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    st = cfg.stage0
    ds_cfg = build_ds_config(cfg, st, ctx.world_size)
    scorer, tok, warnings = load_scorer_for(run, task.model_source, ds_cfg)
    for w in warnings:
        run.say(f"warning: {w}")
    train = task.train
    plan = plan_steps(
        len(train), st.micro_batch, ctx.world_size, st.epochs, st.grad_accum, st.max_steps
    )
    total = plan.total_optimizer_steps
    engine = build_engine(
        scorer,
        ds_cfg,
        st.lr,
        st.weight_decay,
        total,
        warmup_steps(total, st.warmup_ratio),
        st.schedule,
    )
    del scorer  # the engine holds the module; release_engine must free the last reference
    checkpoint.seed_rank(cfg.run.seed, ctx.rank)  # per-rank dropout; a resume restores RNG
    moves = Movement.take(run, "stage0", engine, st, total)
    moves.warn_if_stuck("stage0")
    run.say(
        f"stage 0: English fine-tuning on {len(train)} examples, {total} optimizer steps "
        f"(ZeRO-{ds_cfg['zero_optimization']['stage']}, {ctx.world_size} rank(s))"
    )
    labels = train.labels()
    lang = task.train_language

    def step(batch: list[int]) -> torch.Tensor:
        views = [train.examples[i].views[lang] for i in batch]
        langs = None if task.label_words is None else [task.lang_id(lang)] * len(batch)
        return cross_entropy_step(
            engine, tok, views, labels[batch], cfg.model.max_length, ctx.device, langs
        )

    best = BestKeeper.for_stage0(run)
    point = resume_point(run, "stage0", engine, best)
    if not point["complete"]:
        seed = cfg.run.seed
        train_loop(run, "stage0", engine, tok, plan, len(train), st, seed, step, point,
                   on_dev=best)  # fmt: skip
        save_stage(run, "stage0", engine, plan.total_micro, complete=True, on_dev=best)
    out = run.run_dir / "stage0" / "model"
    made_by = partial(rundir.write_provenance, cfg=cfg)
    change = moves.report(export_hf(engine, tok, out, ctx, made_by), engine.global_steps)
    if ctx.is_main:
        atomic_write_json(run.run_dir / "stage0" / "param_change.json", change)
    run.say(f"stage 0 done: model exported to {out}")
    release_engine(engine)
    return stage0_source(run)


def load_scorer_for(run: Run, source: str, ds_cfg: dict) -> tuple[Any, Any, list[str]]:
    cfg, task = run.cfg, run.task
    return load_for_stage(
        cfg.model.family, source, task.num_labels, task.label_words, cfg.model.dropout,
        ds_cfg, head=task.head, languages=task.prompt_languages,
        freeze_embeddings=cfg.model.freeze_embeddings,
    )  # fmt: skip


def stage0_source(run: Run) -> str:
    """The stage-0 model that distill starts from: the best by dev accuracy when one was
    kept (``stage0.keep_best``), else the last."""
    best = run.run_dir / "stage0" / "best"
    keep = run.cfg.stage0.keep_best and parallel.decide((best / "config.json").is_file, run.ctx)
    return str(best) if keep else str(run.run_dir / "stage0" / "model")


@dataclass
class BestKeeper:
    """Keeps the model with the best dev metric seen so far as a Hugging Face folder (atomic
    export) plus ``best.json``; the decision uses all-reduced accuracies, so every rank agrees
    and joins the (collective, under ZeRO-3) export."""

    run: Run
    folder: Path
    metric: str  # "english" | "average"
    best: float | None = None

    @classmethod
    def for_stage0(cls, run: Run) -> BestKeeper | None:
        st = run.cfg.stage0
        if not st.keep_best or run.task.dev is None or not run.cfg.eval.every_epoch:
            return None
        metric = st.best_metric if run.task.english is not None else "average"
        return cls(run, run.run_dir / "stage0" / "best", metric)

    def state(self) -> dict:
        """What a checkpoint must hold to resume the keeper exactly."""
        return {"best": self.best}

    def restore(self, state: dict) -> None:
        self.best = state["best"]

    def value(self, summ: dict) -> float:
        if self.metric == "english":
            return float(summ["accuracy"][self.run.task.english])
        return float(summ["averages"]["all"]["accuracy"])

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> bool:
        """Export the model when it is the best so far; never ends the stage early."""
        summ = dev.summ
        value = self.value(summ)
        if self.best is not None and value <= self.best:
            return False
        made_by = partial(rundir.write_provenance, cfg=self.run.cfg)
        export_hf(engine, tok, self.folder, self.run.ctx, made_by)  # may stop: nothing kept
        self.best = value
        if self.run.ctx.is_main:
            atomic_write_json(
                self.folder.parent / "best.json",
                {"metric": self.metric, "value": value, "step": step, "dev": summ["accuracy"]},
            )
        self.run.say(f"new best {self.metric} dev accuracy {value:.2f} at step {step}")
        return False


STAGE_TITLES = {"stage0": "stage 0 (English fine-tuning)", "distill": "distill (self-distillation)"}


@dataclass
class Movement:
    """A training stage's start weights (rank 0's CPU copy of the trainable ones), how far
    its schedule can move them (:func:`alsace_ds.method.movement.update_bound`, rank 0) and, at the
    end, how far they moved (:meth:`report`). A stage that cannot change the model is warned
    about before it runs; TensorBoard ``<stage>/params/...`` and the report hold the figures."""

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

    def warn_if_stuck(self, section: str) -> None:
        b = self.bound
        if b is None:
            return
        self.run.tb.scalar(f"{self.stage}/params/update_bound", b["bound"], 0)
        self.run.tb.scalar(f"{self.stage}/params/relative_update_bound", b["relative_bound"], 0)
        if b["cannot_change"]:
            self.run.say(
                f"WARNING: {STAGE_TITLES[self.stage]} cannot change the model: "
                f"{b['cannot_change']}. Raise {section}.lr or {section}.epochs (the presets' "
                "stage-2 schedules reproduce the paper's total update: README, 'Stage-2 "
                "schedule')."
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


def _stage0_change(run: Run) -> dict | None:
    """Stage 0's parameter change, kept beside its model (a resumed run skips the stage)."""
    info = run.run_dir / "stage0" / "param_change.json"
    if not (run.ctx.is_main and run.cfg.stage0.enabled and info.is_file()):
        return None
    return json.loads(info.read_text())


def train_loop(
    run: Run,
    stage: str,
    engine: Any,
    tok: Any,
    plan: StepPlan,
    n: int,
    st: Stage0Config | DistillConfig,
    seed: int,
    step: Callable[[list[int]], torch.Tensor],
    point: dict,
    roles: tuple[list[str], list[str]] | None = None,
    on_dev: DevCallback | None = None,
) -> bool:
    """The micro-step loop shared by both training stages: ``step(batch) -> loss`` does the
    forward/backward/step; dev checks at epoch ends (and every ``st.eval_every`` optimizer
    steps where the stage has it), mean loss every ``run.log_every`` steps, checkpoint / stop
    decisions at optimizer-step boundaries. ``point`` (:func:`resume_point`) resumes
    mid-stage, first redoing a dev check that a stop interrupted. ``on_dev`` sees each dev
    check and returns True to end the stage early (the same on every rank: its inputs are
    all-reduced); its state goes into every checkpoint. Returns whether it ended early."""
    start = point["micro"]
    engine.train()
    bar = progress(plan.total_micro, stage, run.ctx, run.cfg.log.progress)
    bar.update(start)
    losses: list[torch.Tensor] = []
    last_epoch = (start - 1) // plan.micro_per_epoch if start else 0
    ctx = run.ctx  # data parallel across view groups (a group shares its examples)
    batches = micro_batches(n, st.micro_batch, ctx.dp_rank, ctx.dp_world, seed, plan, start)
    every = getattr(st, "eval_every", 0)  # > 0: checks every `every` steps, not at epoch ends

    def check(micro: int) -> bool:
        """A dev check; a stop inside it commits the step before it (check redone on resume)."""
        try:
            return after_dev(run, engine, tok, stage, roles, on_dev)
        except signals.StopRequested as stop:
            save_stage(run, stage, engine, micro, complete=False, on_dev=on_dev, pending_dev=True)
            at = f"at optimizer step {engine.global_steps}"
            raise signals.Preempted(f"{stage}: {stop} {at}") from None

    stopped = point.get("pending_dev", False) and check(start)
    for micro, epoch, batch in [] if stopped else batches:
        if epoch != last_epoch:
            last_epoch = epoch
            if not every and check(micro):
                stopped = True
                break
        losses.append(step(batch))
        bar.update(1)
        if (micro + 1) % (st.grad_accum * run.cfg.run.log_every) == 0:
            log_train(run, stage, engine, losses, bar)
        if (micro + 1) % st.grad_accum == 0:
            last = micro + 1 == plan.total_micro
            due = bool(every) and engine.global_steps % every == 0 and not last
            step_boundary(run, stage, engine, micro + 1, last, on_dev, dev_due=due)
            if due and check(micro + 1):
                stopped = True
                break
    if losses:
        log_train(run, stage, engine, losses, bar)
    bar.close()
    if not stopped:
        check(plan.total_micro)
    engine.train()
    return stopped


class DevCallback(typing.Protocol):
    """What a training stage calls after each dev check (:class:`BestKeeper`,
    :class:`DevMonitor`): True ends the stage; its state is part of every checkpoint."""

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> bool: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


def after_dev(run: Run, engine: Any, tok: Any, stage: str, roles, on_dev) -> bool:
    dev = dev_check(run, engine, tok, stage, engine.global_steps, roles)
    stop = False
    if dev is not None and on_dev is not None:
        before = on_dev.state()
        try:
            stop = bool(on_dev(engine, tok, dev, engine.global_steps))
        except signals.StopRequested:
            on_dev.restore(before)  # the check is redone on resume: count it once
            raise
    engine.train()
    return stop


def ckpt_dir(run: Run, stage: str) -> Path:
    return run.run_dir / "checkpoints" / stage


def launch_facts(cfg: Config, stage: str, world_size: int) -> dict:
    """The launch a stage's checkpoint is only valid for (ZeRO keeps state per rank)."""
    name = stage
    st = cfg.stage0 if name == "stage0" else cfg.distill
    zero = int(build_ds_config(cfg, st, world_size)["zero_optimization"]["stage"])
    view = 1 if name == "stage0" else int(cfg.distill.view_parallel_size)
    return rundir.launch_facts(world_size, view, zero)


def save_stage(
    run: Run,
    stage: str,
    engine: Any,
    micro: int,
    complete: bool,
    on_dev: DevCallback | None = None,
    pending_dev: bool = False,
) -> None:
    """Commit the stage's training state with DeepSpeed's checkpoint (collective)."""
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
    checkpoint.commit(engine, ckpt_dir(run, stage), tag, run.ctx, state,
                      keep=run.cfg.run.keep_checkpoints)  # fmt: skip
    if run.ctx.is_main:
        run.last_commit = time.monotonic()


def step_boundary(
    run: Run,
    stage: str,
    engine: Any,
    micro: int,
    last: bool,
    on_dev: DevCallback | None,
    dev_due: bool = False,
) -> None:
    """After an optimizer step: periodic checkpoint (every ``run.checkpoint_every`` steps or
    ``run.checkpoint_minutes`` by rank 0's clock); and a stop that every rank agrees on (a
    request seen by any rank, or ``run.stop_after_steps``) commits and raises ``Preempted``.
    The stage's last step only counts: its caller commits the completed checkpoint, and a
    stop asked for then takes effect at the next poll. ``dev_due``: a dev check follows this
    step; a stop here commits it as pending, so the resumed run does it first."""
    run.steps_done += 1
    if last:
        return
    rc = run.cfg.run
    want = signals.requested() or (rc.stop_after_steps is not None
                                   and run.steps_done >= rc.stop_after_steps)  # fmt: skip
    minutes = checkpoint_minutes(rc.checkpoint_minutes, os.environ)
    due = bool(minutes) and run.ctx.is_main and time.monotonic() - run.last_commit >= 60 * minutes
    stop, due = parallel.any_rank([want, due], run.ctx)  # the same on every rank
    every = rc.checkpoint_every
    if stop or due or (every and engine.global_steps % every == 0):
        pending = stop and dev_due  # a periodic commit is followed by its check right here
        save_stage(run, stage, engine, micro, False, on_dev=on_dev, pending_dev=pending)
    if stop:
        why = "run.stop_after_steps" if want and not signals.requested() else signals.reason()
        raise signals.Preempted(f"{stage} stopped at optimizer step {engine.global_steps} ({why})")


SLURM_CHECKPOINT_MINUTES = 30.0


def checkpoint_minutes(configured: float | None, env: typing.Mapping[str, str]) -> float:
    """``run.checkpoint_minutes``; null: periodic commits inside a Slurm job, none elsewhere."""
    if configured is not None:
        return configured
    return SLURM_CHECKPOINT_MINUTES if "SLURM_JOB_ID" in env else 0.0


def resume_point(run: Run, stage: str, engine: Any, on_dev: DevCallback | None = None) -> dict:
    """Load the stage's committed checkpoint into ``engine`` (``run.resume: auto``; the run
    directory was checked at start) and restore ``on_dev``'s state from it."""
    folder = ckpt_dir(run, stage)
    auto = run.cfg.run.resume == "auto"
    tag = parallel.decide(lambda: checkpoint.read_latest(folder), run.ctx) if auto else None
    if tag is None:
        return {"micro": 0, "complete": False}
    state = checkpoint.load(engine, folder, tag, run.ctx)
    if on_dev is not None and state.get("callback") is not None:
        on_dev.restore(state["callback"])
    run.say(f"{stage}: resumed from checkpoint {tag} (micro-step {state['micro']})")
    return state


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


# ----------------------------------------------------------------------------- selection


def run_selection(run: Run, engine: Any, tok: Any) -> dict:
    """Teacher selection on the unlabeled corpus with views dealt across ranks; vote counts
    and confidence sums are all-reduced inside ``select_from_views``. Returns what
    ``selection.json`` holds (``teachers_used`` / ``students_used``: after any override)."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    corpus = task.unlabeled
    T = len(task.languages)
    views = parallel_views(corpus, task.languages)
    run.say(f"selection: label distributions of {len(views)} unlabeled views")
    idx, probs = predict_probs(
        engine, tok, views, ctx, cfg.selection.batch_size, cfg.model.max_length,
        "selection", cfg.log.progress, view_langs(run, len(views)),
    )  # fmt: skip
    sel = select_from_views(
        probs, idx // T, idx % T, len(corpus), task.languages,
        threshold=cfg.selection.threshold, reduce=parallel.reducer(ctx),
    )  # fmt: skip
    teachers, students = sel.teachers, sel.students
    if not teachers and cfg.selection.teachers is None:
        best = max(float(x) for x in sel.scores)
        raise RuntimeError(
            f"selection: no language reached selection.threshold={sel.threshold:g} "
            f"(highest shat_t = {best:.4f}); lower the threshold or leave it null (= 1/|T|)"
        )
    if cfg.selection.teachers is not None:  # ablation: override the vote
        chosen = task.languages if cfg.selection.teachers == ["all"] else cfg.selection.teachers
        teachers = [x for x in task.languages if x in chosen]
        students = [x for x in task.languages if x not in chosen]
    for i, lang in enumerate(task.languages):
        run.tb.scalar(f"selection/s_t/{lang}", float(sel.confidence[i]), 0)
        run.tb.scalar(f"selection/shat_t/{lang}", float(sel.scores[i]), 0)
        run.tb.scalar(f"selection/agreement/{lang}", float(sel.agreement[i]), 0)
    out = sel.to_dict()
    out.update(
        {
            "corpus": corpus.path,
            "override": cfg.selection.teachers,
            "teachers_used": teachers,
            "students_used": students,
        }
    )
    if ctx.is_main:
        atomic_write_json(run.run_dir / "selection.json", out)
    run.say(f"selection: theta={sel.threshold:.4f} teachers={teachers} students={students}")
    return out


# ----------------------------------------------------------------------------- distill


def local_languages(languages: list[str], ctx: parallel.ParallelContext) -> list[str]:
    """The language slots this rank runs: ``ceil(T / V)`` per member of the view group, the
    slots past T padded with a copy of the first language (same forward count on every rank;
    the padded outputs are cut off after the gather, so they get no loss and no gradient)."""
    per = -(-len(languages) // ctx.view_size)
    slots = range(ctx.view_rank * per, (ctx.view_rank + 1) * per)
    return [languages[j] if j < len(languages) else languages[0] for j in slots]


def distill_step(
    run: Run, engine: Any, tok: Any, batch: list[int], teachers: list[str]
) -> torch.Tensor:
    """One micro-step: ONE forward over this rank's B x T_local views, the view group's
    distributions gathered (differentiably) to ``[B, T, C]``, KL over all (any, teacher) pairs.
    Every member computes the same group loss; the gather's backward sums the members'
    gradients into each view's owner, and DeepSpeed's average over all ranks then equals the
    mean over view groups (= the one-rank result when there is one group)."""
    d = run.cfg.distill
    langs = run.task.languages
    mine = local_languages(langs, run.ctx)
    examples = run.task.unlabeled.examples
    views = [examples[i].views[lang] for i in batch for lang in mine]
    lang_ids = None
    if run.task.label_words is not None:
        lang_ids = [run.task.lang_id(lang) for _ in batch for lang in mine]
    logits = forward_views(engine, tok, views, run.cfg.model.max_length, run.ctx.device, lang_ids)
    local = torch.log_softmax(logits.float(), dim=-1).view(len(batch), len(mine), -1)
    log_probs = parallel.gather_views(local, run.ctx)[:, : len(langs)]  # [B, T, C]
    loss = pair_kl_loss(
        log_probs, langs, teachers,
        pairs=d.pairs, direction=d.direction, detach_teacher=d.detach_teacher,
    )  # fmt: skip
    engine.backward(loss)
    engine.step()
    return loss.detach()


class DevMonitor:
    """Stage 2's dev checks -> the collapse guard (:mod:`alsace_ds.method.guard`): TensorBoard
    curves, ``distill_guard.json`` (its state, for reading; a resume takes the state from the
    checkpoint), the best healthy model exported to ``distill/best``, the early-stop decision."""

    def __init__(self, run: Run, source: str) -> None:
        d = run.cfg.distill
        self.run, self.source = run, source
        self.guard = Guard(
            d.guard_max_en_drop, d.guard_min_entropy_ratio, d.guard_patience,
            min_agreement=d.guard_min_agreement,
        )  # fmt: skip
        self.path = run.run_dir / "distill_guard.json"
        self.best_dir = run.run_dir / "distill" / "best"
        self.reference: torch.Tensor | None = None  # [N, T] predictions at the start
        self.stopped_early = False

    def state(self) -> dict:
        """The guard's history, bad-check counter, best check and start predictions."""
        ref = None if self.reference is None else self.reference.clone()
        return {"guard": copy.deepcopy(self.guard.state()), "reference": ref,
                "stopped_early": self.stopped_early}  # fmt: skip

    def restore(self, state: dict) -> None:
        self.guard.load(copy.deepcopy(state["guard"]))
        self.reference = state["reference"]
        self.stopped_early = state["stopped_early"]

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> bool:
        task = self.run.task
        T = len(task.languages)
        sums = monitor_sums(
            dev.probs, dev.idx // T, dev.idx % T, len(task.dev), T, task.dev.labels()
        )  # fmt: skip
        sums = {k: parallel.all_reduce_sum(v, self.run.ctx) for k, v in sums.items()}
        metrics, pred = monitor_metrics(sums, task.languages, task.english, self.reference)
        if self.reference is None:
            self.reference = pred
        verdict = self.guard.check(metrics, step)
        self._log(metrics, verdict, step)
        if verdict["improved"] and step > 0 and self.run.cfg.distill.keep_best:
            made_by = partial(rundir.write_provenance, cfg=self.run.cfg)
            export_hf(engine, tok, self.best_dir, self.run.ctx, made_by)
        if verdict["problems"]:
            for p in verdict["problems"]:
                self.run.say(f"GUARD step {step}: {p}")
        self.stopped_early = verdict["stop"]
        if self.run.ctx.is_main:
            state = {"guard": self.guard.state(), "reference": self.reference.tolist()}
            atomic_write_json(self.path, state)  # for people and tools; resume reads the ckpt
        if verdict["stop"]:
            self.run.say(f"GUARD: stopping distill early at step {step}")
        return verdict["stop"] and self.run.cfg.distill.guard

    def _log(self, m: dict, verdict: dict, step: int) -> None:
        tb = self.run.tb
        if "english_accuracy" in m:
            tb.scalar("distill/guard/english_dev_accuracy", m["english_accuracy"], step)
        tb.scalars("distill/guard/mean_prediction_entropy_bits",
                   m["mean_prediction_entropy_bits"], step)  # fmt: skip
        tb.scalars("distill/guard/agreement_with_start", m["agreement_with_start"], step)
        tb.scalar("distill/guard/consistency", m["consistency"], step)
        tb.scalar("distill/guard/healthy", float(verdict["healthy"]), step)

    def best_source(self, last_step: int) -> str | None:
        """The folder of the best healthy check when it is not the last model; None = last."""
        best = self.guard.best_step
        if not self.run.cfg.distill.keep_best or best is None or best == last_step:
            return None
        return self.source if best == 0 else str(self.best_dir)

    def summary(self, final_from: str) -> dict:
        return {
            "best_step": self.guard.best_step,
            "stopped_early": self.stopped_early,
            "final_from": final_from,
            "checks": self.guard.history,
        }


DISTILL_NAMES = {"alsace": "self-distillation", "english_self_training": "English self-training"}


def run_distill(
    run: Run, engine: Any, tok: Any, teachers: list[str], students: list[str],
    monitor: DevMonitor | None, moves: Movement,
) -> None:  # fmt: skip
    cfg, ctx = run.cfg, run.ctx
    d = cfg.distill
    n = len(run.task.unlabeled)
    T = len(run.task.languages)
    plan = plan_steps(n, d.micro_batch, ctx.dp_world, d.epochs, d.grad_accum, d.max_steps)
    total = plan.total_optimizer_steps
    theirs = authors_update(T, len(teachers), n) if teachers else None
    if moves.bound is not None and theirs is not None:
        moves.bound["authors_equivalent"] = dataclasses.asdict(theirs)
    run.say(
        f"distill: {DISTILL_NAMES[d.method]} on {n} parallel examples x {T} languages, {total} "
        f"optimizer steps, lr {d.lr:g} ({d.schedule}): Adam moves a weight by at most the sum "
        f"of the learning rates, {moves.most:.3g}"
        + (f"; the authors' recipe for this pair set ({theirs.pairs} pairs of {len(teachers)} "
           f"teachers, {theirs.steps} steps x lr {theirs.lr:g}) sums to {theirs.lr_sum:.3g}"
           if theirs else "")
    )  # fmt: skip
    moves.warn_if_stuck("distill")
    point = resume_point(run, "distill", engine, monitor)
    if point["complete"]:
        return
    if monitor is not None and point["micro"] == 0:
        after_dev(run, engine, tok, "distill", (teachers, students), monitor)  # the start
    if d.method == "english_self_training":
        step, n = english_self_training_step(run, engine, tok)
        # The same optimizer steps (compute, lr schedule) as ALSACE, over the kept half.
        per_epoch = d.grad_accum * -(-n // (d.micro_batch * ctx.dp_world * d.grad_accum))
        plan = StepPlan(per_epoch, plan.total_micro, plan.grad_accum)
    else:
        step = partial(distill_step, run, engine, tok, teachers=teachers)
    train_loop(
        run, "distill", engine, tok, plan, n, d, cfg.run.seed + 1000, step,
        point, roles=(teachers, students), on_dev=monitor,
    )  # fmt: skip
    save_stage(run, "distill", engine, plan.total_micro, complete=True, on_dev=monitor)


def english_self_training_step(run: Run, engine: Any, tok: Any):
    """Paper Table 4's English self-training: pseudo-label the unlabeled English views with
    the fine-tuned model, keep the most confident half, cross-entropy on those."""
    task, cfg = run.task, run.cfg
    english = task.english or task.train_language
    corpus = task.unlabeled.subset(range(len(task.unlabeled)))
    views = [ex.views[english] for ex in corpus.examples]
    langs = None if task.label_words is None else [task.lang_id(english)] * len(views)
    idx, probs = predict_probs(
        engine, tok, views, run.ctx, cfg.selection.batch_size, cfg.model.max_length,
        "self-training: pseudo-labels", cfg.log.progress, langs,
    )  # fmt: skip
    N, C = len(views), task.num_labels
    dense = torch.zeros(N, C, dtype=torch.float64)
    dense[idx] = probs.to(torch.float64)
    dense = parallel.all_reduce_sum(dense, run.ctx)  # every rank: all N distributions
    keep, labels = most_confident(dense, 0.5)
    kept = [corpus.examples[i] for i in keep.tolist()]
    run.say(f"self-training: kept the {len(kept)} most confident of {N} English pseudo-labels")

    def step(batch: list[int]) -> torch.Tensor:
        views_b = [kept[i].views[english] for i in batch]
        ids = None if langs is None else langs[: len(batch)]
        return cross_entropy_step(
            engine, tok, views_b, labels[batch], cfg.model.max_length, run.ctx.device, ids
        )

    return step, len(kept)


# ----------------------------------------------------------------------------- the whole run


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


def run_pipeline(cfg: Config, task: TaskData, ctx: parallel.ParallelContext) -> dict:
    run_dir = Path(cfg.run.output_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    parallel.barrier(ctx)
    run = Run(
        cfg, task, ctx, run_dir, TBLogger(run_dir / "tb", cfg.log.tensorboard and ctx.is_main)
    )
    addr = f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}"
    run.say(
        f"{ctx.world_size} rank(s) on {ctx.device.type} (rank 0: {ctx.device}), rendezvous {addr}"
    )
    torch.manual_seed(cfg.run.seed)  # model initialisation: the same on every rank
    try:
        return _run_stages(run)
    finally:
        run.tb.close()


def _stats_json(stats: dict[str, torch.Tensor]) -> dict:
    return {k: v.tolist() for k, v in stats.items()}


def _stats_of(saved: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()}


def _cached(run: Run, name: str) -> Any:
    """A finished result of an earlier attempt of this run (``results/<name>.json``)."""
    value = rundir.load_result(run.run_dir, name, run.ctx) if run.cfg.run.resume == "auto" else None
    if value is not None:
        run.say(f"{name}: reusing the result of an earlier attempt (results/{name}.json)")
    return value


def _run_stages(run: Run) -> dict:
    cfg, task, ctx = run.cfg, run.task, run.ctx
    source = task.model_source
    if cfg.stage0.enabled:
        exported = parallel.decide(partial(rundir.stage0_exported, run.run_dir), ctx)
        source = stage0_source(run) if exported else run_stage0(run)  # exports are atomic
        run.say(f"distill starts from {source}")
    d = cfg.distill
    run.ctx = ctx = parallel.with_view_groups(ctx, d.view_parallel_size)
    if ctx.view_size > 1:
        run.say(f"distill layout: {ctx.dp_world} data-parallel group(s) x {ctx.view_size} "
                "rank(s) sharing each example's language views")  # fmt: skip
    before_saved, sel, final = _cached(run, "before"), _cached(run, "selection"), None
    if d.enabled:
        final = _cached(run, "final")
    engine = tok = moves = None
    ds_cfg = build_ds_config(cfg, d, ctx.world_size)
    plan = plan_steps(
        len(task.unlabeled), d.micro_batch, ctx.dp_world, d.epochs, d.grad_accum, d.max_steps
    )
    total = plan.total_optimizer_steps
    if before_saved is None or sel is None or (d.enabled and final is None):
        scorer, tok, _ = load_scorer_for(run, source, ds_cfg)
        engine = build_engine(scorer, ds_cfg, d.lr, d.weight_decay, total,
                              warmup_steps(total, d.warmup_ratio), d.schedule)  # fmt: skip
        del scorer  # the engine holds the module; release_engine must free the last reference
        checkpoint.seed_rank(cfg.run.seed + 1000, ctx.rank)
        moves = Movement.take(run, "distill", engine, d, total) if d.enabled else None
    if before_saved is None:
        before_saved = _stats_json(evaluate(run, engine, tok, task.test, "evaluate (before)"))
        rundir.save_result(run.run_dir, "before", before_saved, ctx)
    if sel is None:
        sel = run_selection(run, engine, tok)
        rundir.save_result(run.run_dir, "selection", sel, ctx)
    teachers, students = sel["teachers_used"], sel["students_used"]
    before = summary(run, _stats_of(before_saved), teachers, students)
    log_summary(run, "eval/before", before, 0)

    after, guard = None, None
    changes = {"stage0": _stage0_change(run)}
    if d.enabled:
        if final is None:
            engine, tok, final = _distill_and_evaluate(
                run, engine, tok, source, ds_cfg, total, (teachers, students), moves
            )
        after = summary(run, _stats_of(final["after"]), teachers, students)
        log_summary(run, "eval/after", after, final["steps"])
        changes["distill"], guard = final["change"], final["guard"]
    if engine is not None:
        release_engine(engine)
    return write_report(run, sel["threshold"], teachers, students, before, after, guard, changes)


def _distill_and_evaluate(run: Run, engine, tok, source, ds_cfg, total, roles, moves):
    """Stage 2, the guard's choice of final model, its evaluation and export; the
    evaluation is kept (``results/after.json``) as soon as it is done."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    d = cfg.distill
    teachers, students = roles
    checks = task.dev is not None and cfg.eval.every_epoch  # no dev checks: no guard
    monitor = DevMonitor(run, source) if checks and d.guard else None
    run_distill(run, engine, tok, teachers, students, monitor, moves)
    steps = engine.global_steps
    best = monitor.best_source(steps) if monitor else None
    if best is not None:  # the guard kept an earlier, healthy model: report that one
        run.say(f"distill: the final model is the best healthy check, {best}")
        release_engine(engine)
        del engine
        scorer, tok, _ = load_scorer_for(run, best, ds_cfg)
        engine = build_engine(scorer, ds_cfg, d.lr, d.weight_decay, total, 0)
        del scorer
    after_saved = _cached(run, "after")
    if after_saved is None:
        after_saved = _stats_json(evaluate(run, engine, tok, task.test, "evaluate (after)"))
        rundir.save_result(run.run_dir, "after", after_saved, ctx)
    made_by = partial(rundir.write_provenance, cfg=cfg)
    exported = export_hf(engine, tok, run.run_dir / "final" / "model", ctx, made_by)
    final = {
        "after": after_saved,
        "steps": steps,
        "change": moves.report(exported, steps),  # rank 0's; saved by rank 0
        "guard": monitor.summary(best or "last step") if monitor else None,
    }
    rundir.save_result(run.run_dir, "final", final, ctx)
    return engine, tok, final


def health_warnings(before: dict, after: dict | None, english: str | None) -> list[str]:
    """Signs that distillation hurt: a smaller gap bought with lower accuracy is a failure."""
    if after is None:
        return []
    out = []
    b, a = before["averages"]["all"]["accuracy"], after["averages"]["all"]["accuracy"]
    if a < b:
        out.append(f"average accuracy fell from {b:.2f} to {a:.2f}: a smaller gap is no gain here")
    drop = 0.0 if english is None else before["accuracy"][english] - after["accuracy"][english]
    if drop > 2.0:
        out.append(f"{english} accuracy fell by {drop:.2f} points")
    for lang, h_b in before.get("prediction_entropy_bits", {}).items():
        h_a = after["prediction_entropy_bits"][lang]
        if h_a < 0.5 * h_b:
            out.append(
                f"{lang}: prediction entropy fell from {h_b:.2f} to {h_a:.2f} bits "
                "(predictions collapsing toward one label)"
            )
    return out


def guard_markdown(guard: dict, english: str | None) -> str:
    """The stage-2 dev checks as a table: the collapse guard's view of the run."""
    head = (
        "| step | "
        + (f"{english} dev acc | " if english else "")
        + ("min mean-pred entropy (bits) | min agreement with start | consistency | healthy |")
    )
    cols = head.count("|") - 1
    lines = ["## Collapse guard (dev checks of distill)", "", head, "|" + "---:|" * cols]
    for c in guard["checks"]:
        en = f"{c['english_accuracy']:.2f} | " if english else ""
        lines.append(
            f"| {c['step']} | {en}{min(c['mean_prediction_entropy_bits'].values()):.3f} | "
            f"{min(c['agreement_with_start'].values()):.1f} | {c['consistency']:.2f} | "
            f"{'yes' if c['healthy'] else 'NO: ' + '; '.join(c['problems'])} |"
        )
    lines += ["", f"Latest healthy check (kept): step {guard['best_step']}; final model from "
              f"{guard['final_from']}; stopped early: {guard['stopped_early']}.", ""]  # fmt: skip
    return "\n".join(lines)


def _stage0_best(run: Run) -> dict | None:
    info = run.run_dir / "stage0" / "best.json"
    if not (run.cfg.stage0.enabled and run.cfg.stage0.keep_best and info.is_file()):
        return None
    return yaml.safe_load(info.read_text())


def movement_markdown(changes: dict) -> str:
    """The parameter change of each stage beside what its schedule could do at most."""
    rows = [(k, v) for k, v in changes.items() if v]
    if not rows:
        return ""
    dtype = rows[0][1]["compute_dtype"]
    lines = [
        "## How far training moved the weights (trainable ones, fp32 master)",
        "",
        f"| stage | steps | peak lr | schedule | Σ lr (max Adam move) | bound on ‖Δ‖/‖θ‖ | "
        f"‖Δ‖/‖θ‖ | weights changed | changed in {dtype} | max abs Δ |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, c in rows:
        b = c.get("bound") or {}
        lines.append(
            f"| {stage} | {b.get('steps', '')} | {b.get('peak_lr', 0):.3g} | "
            f"{b.get('schedule', '')} | {b.get('bound', 0):.3g} | "
            f"{b.get('relative_bound', 0):.3g} | {c['relative_change']:.3g} | "
            f"{100 * c['changed_share']:.2f}% | {100 * c['changed_share_compute']:.2f}% | "
            f"{c['max_abs_change']:.3g} |"
        )
    notes = [f"- **WARNING** {s}: {c['bound']['cannot_change']}" for s, c in rows
             if (c.get("bound") or {}).get("cannot_change")]  # fmt: skip
    return "\n".join(lines + [""] + notes) + "\n"


def write_report(
    run: Run, threshold: float, teachers, students, before, after, guard=None, changes=None
) -> dict:
    roles = {x: ("teacher" if x in teachers else "student") for x in run.task.languages}
    warnings = health_warnings(before, after, run.task.english)
    report = {
        "english": run.task.english,
        "languages": run.task.languages,
        "teachers": teachers,
        "students": students,
        "threshold": threshold,
        "test_file": run.task.test.path,
        "num_test_examples": len(run.task.test),
        "unlabeled_file": run.task.unlabeled.path,
        "num_unlabeled_examples": len(run.task.unlabeled),
        "head": run.task.head,
        "stage0_start": _stage0_best(run),
        "before": before,
        "after": after,
        "warnings": warnings,
        "data_notes": run.task.notes,
        "method": run.cfg.distill.method,
        "guard": guard,
        "param_change": changes or {},
    }
    states = states_of(before, after, run.cfg.model.name_or_path.rstrip("/").split("/")[-1])
    tables = {"table2": table2(states, run.task.english), "table3": table3(states)}
    report["tables"] = tables
    table = markdown_table(before, after, roles)
    en = run.task.english
    gap_note = (
        f"gap = acc({en}) - acc(t); average gaps are over the languages other than {en}"
        if en
        else "no reference language (no English view): accuracies only"
    )
    md = (
        f"# ALSACE report\n\nTest set: `{run.task.test.path}` ({len(run.task.test)} parallel "
        f"examples x {len(run.task.languages)} languages). Accuracy in %, {gap_note}."
        f"\n\nTeachers: {', '.join(teachers)}; "
        f"students: {', '.join(students) or '–'} (theta = {threshold:.4f}).\n\n{table}"
        f"\n## Per language (paper Table 2 layout)\n\n{to_markdown(tables['table2'])}"
        f"\n## Students / teachers / all (paper Table 3 layout)\n\n{to_markdown(tables['table3'])}"
    )
    if warnings:
        md += "\n" + "".join(f"**WARNING**: {w}\n" for w in warnings)
    if changes and any(changes.values()):
        md += "\n" + movement_markdown(changes)
    if guard is not None:
        md += "\n" + guard_markdown(guard, run.task.english)
    if run.task.notes:
        md += "\n## Data notes\n\n" + "".join(f"- {n}\n" for n in run.task.notes)
    if run.ctx.is_main:
        atomic_write_json(run.run_dir / "report.json", report)
        atomic_write_text(run.run_dir / "report.md", md)
        for name, rows in tables.items():
            atomic_write_text(run.run_dir / f"{name}.csv", to_csv(rows))
        print("\n" + md, flush=True)
    parallel.barrier(run.ctx)
    return report
