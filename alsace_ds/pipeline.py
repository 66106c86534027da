"""The ALSACE stages on DeepSpeed: English fine-tuning -> teacher selection ->
cross-lingual self-distillation -> evaluation before and after.

Outputs, all under ``run.output_dir`` and written atomically:
``config.yaml`` (resolved), ``selection.json``, ``report.json`` / ``report.md``,
``checkpoints/<stage>/`` (DeepSpeed), ``stage0/model`` and ``final/model`` (plain Hugging
Face folders) and ``tb/`` (TensorBoard events).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from alsace_ds import dist, signals
from alsace_ds.config import Config, ConfigError, DistillConfig, Stage0Config
from alsace_ds.data import ParallelCorpus, View
from alsace_ds.distill import pair_kl_loss
from alsace_ds.ds_config import build_ds_config
from alsace_ds.evaluate import accuracy_counts, markdown_table, summarize
from alsace_ds.guard import Guard, monitor_metrics, monitor_sums
from alsace_ds.io import atomic_write_json, atomic_write_text
from alsace_ds.movement import change_stats, update_bound
from alsace_ds.report import states_of, table2, table3, to_csv, to_markdown
from alsace_ds.schedules import authors_update, lr_sum, warmup_steps
from alsace_ds.selection import Selection, most_confident, select_from_views
from alsace_ds.shm_cleanup import unlink_own_buffer
from alsace_ds.tasks import TaskData
from alsace_ds.tb import TBLogger
from alsace_ds.trainer import (
    StepPlan,
    build_engine,
    cross_entropy_step,
    current_lr,
    export_hf,
    forward_views,
    latest_tag,
    load_checkpoint,
    load_for_stage,
    micro_batches,
    plan_steps,
    predict_probs,
    progress,
    rank0_state_dict,
    release_engine,
    save_checkpoint,
    trainable_names,
)


@dataclass
class Run:
    """What every stage needs: config, data, distributed context, output places."""

    cfg: Config
    task: TaskData
    ctx: dist.DistContext
    run_dir: Path
    tb: TBLogger
    steps_done: int = 0  # optimizer steps in this invocation, over both stages

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
    return {k: dist.all_reduce_sum(v, run.ctx) for k, v in stats.items()}


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


def stage0_finetune(run: Run) -> str:
    """English fine-tuning; returns the exported model folder that stage 2 starts from."""
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
    point = resume_point(run, "stage0", engine)
    if not point["complete"]:
        seed = cfg.run.seed
        train_loop(
            run, "stage0", engine, tok, plan, len(train), st, seed, step, point["micro"],
            on_dev=best.update if best else None,
        )  # fmt: skip
        save_stage(run, "stage0", engine, plan.total_micro, complete=True)
    out = run.run_dir / "stage0" / "model"
    change = moves.report(export_hf(engine, tok, out, ctx), engine.global_steps)
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
    """The stage-0 model that stage 2 starts from: the best by dev accuracy when one was
    kept (``stage0.keep_best``), else the last."""
    best = run.run_dir / "stage0" / "best"
    keep = run.cfg.stage0.keep_best and dist.decide((best / "config.json").is_file, run.ctx)
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
        keeper = cls(run, run.run_dir / "stage0" / "best", metric)
        info = keeper.folder.parent / "best.json"
        if run.cfg.run.resume == "auto":  # a resumed stage keeps its best (rank 0 reads it)
            keeper.best = dist.decide(partial(_best_value, info), run.ctx)
        return keeper

    def value(self, summ: dict) -> float:
        if self.metric == "english":
            return float(summ["accuracy"][self.run.task.english])
        return float(summ["averages"]["all"]["accuracy"])

    def update(self, engine: Any, tok: Any, dev: DevResult, step: int) -> bool:
        summ = dev.summ
        value = self.value(summ)
        if self.best is not None and value <= self.best:
            return False
        self.best = value
        export_hf(engine, tok, self.folder, self.run.ctx)
        if self.run.ctx.is_main:
            atomic_write_json(
                self.folder.parent / "best.json",
                {"metric": self.metric, "value": value, "step": step, "dev": summ["accuracy"]},
            )
        self.run.say(f"new best {self.metric} dev accuracy {value:.2f} at step {step}")
        return False


def _best_value(info: Path) -> float | None:
    return float(yaml.safe_load(info.read_text())["value"]) if info.is_file() else None


STAGE_TITLES = {"stage0": "stage 0 (English fine-tuning)", "stage2": "stage 2 (distillation)"}


@dataclass
class Movement:
    """A training stage's start weights (rank 0's CPU copy of the trainable ones), how far
    its schedule can move them (:func:`alsace_ds.movement.update_bound`, rank 0) and, at the
    end, how far they moved (:meth:`report`). A stage that cannot change the model is warned
    about before it runs; TensorBoard ``<stage>/params/...`` and the report hold the figures."""

    run: Run
    stage: str  # "stage0" | "stage2"
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
    start: int = 0,
    roles: tuple[list[str], list[str]] | None = None,
    on_dev: Callable[[Any, Any, DevResult, int], bool] | None = None,
) -> bool:
    """The micro-step loop shared by both training stages: ``step(batch) -> loss`` does the
    forward/backward/step; dev checks at epoch ends (and every ``st.eval_every`` optimizer
    steps where the stage has it), mean loss every ``run.log_every`` steps, checkpoint / stop
    decisions at optimizer-step boundaries. ``start`` resumes mid-stage. ``on_dev`` sees each
    dev check and returns True to end the stage early (the same on every rank: its inputs
    are all-reduced). Returns whether it ended early."""
    engine.train()
    bar = progress(plan.total_micro, stage, run.ctx, run.cfg.log.progress)
    bar.update(start)
    losses: list[torch.Tensor] = []
    last_epoch = (start - 1) // plan.micro_per_epoch if start else 0
    ctx = run.ctx  # data parallel across view groups (a group shares its examples)
    batches = micro_batches(n, st.micro_batch, ctx.dp_rank, ctx.dp_world, seed, plan, start)
    every = getattr(st, "eval_every", 0)  # > 0: checks every `every` steps, not at epoch ends
    stopped = False
    for micro, epoch, batch in batches:
        if epoch != last_epoch:
            last_epoch = epoch
            if not every and after_dev(run, engine, tok, stage, roles, on_dev):
                stopped = True
                break
        losses.append(step(batch))
        bar.update(1)
        if (micro + 1) % (st.grad_accum * run.cfg.run.log_every) == 0:
            log_train(run, stage, engine, losses, bar)
        if (micro + 1) % st.grad_accum == 0:
            last = micro + 1 == plan.total_micro
            step_boundary(run, stage, engine, micro + 1, last=last)
            if every and engine.global_steps % every == 0 and not last:
                if after_dev(run, engine, tok, stage, roles, on_dev):
                    stopped = True
                    break
    if losses:
        log_train(run, stage, engine, losses, bar)
    bar.close()
    if not stopped:
        after_dev(run, engine, tok, stage, roles, on_dev)
    engine.train()
    return stopped


def after_dev(run: Run, engine: Any, tok: Any, stage: str, roles, on_dev) -> bool:
    dev = dev_check(run, engine, tok, stage, engine.global_steps, roles)
    stop = (
        dev is not None
        and on_dev is not None
        and bool(on_dev(engine, tok, dev, engine.global_steps))
    )
    engine.train()
    return stop


CKPT_NAMES = {"stage0": "stage0", "stage2": "distill", "distill": "distill"}


def ckpt_dir(run: Run, stage: str) -> Path:
    return run.run_dir / "checkpoints" / CKPT_NAMES[stage]


def save_stage(run: Run, stage: str, engine: Any, micro: int, complete: bool) -> None:
    save_checkpoint(
        engine,
        ckpt_dir(run, stage),
        f"step{engine.global_steps}",
        run.ctx,
        {"stage": stage, "micro": micro, "complete": complete},
        keep=run.cfg.run.keep_checkpoints,
    )


def step_boundary(run: Run, stage: str, engine: Any, micro: int, last: bool) -> None:
    """After an optimizer step: periodic checkpoint; and a stop that every rank agrees on (a
    signal seen by any rank, or ``run.stop_after_steps``) saves and raises ``Preempted``.
    The stage's last step only counts: its caller saves the completed checkpoint, and a stop
    asked for then takes effect at the next stage's first step."""
    run.steps_done += 1
    if last:
        return
    limit = run.cfg.run.stop_after_steps
    want = signals.requested() or (limit is not None and run.steps_done >= limit)
    flag = dist.all_reduce_sum(torch.tensor([int(want)], dtype=torch.int64), run.ctx)
    stop = bool(flag.item())  # same value on every rank: no rank-dependent branch below
    every = run.cfg.run.checkpoint_every
    if stop or (every and engine.global_steps % every == 0):
        save_stage(run, stage, engine, micro, complete=False)
    if stop:
        raise signals.Preempted(f"{stage} stopped at optimizer step {engine.global_steps}")


def resume_point(run: Run, stage: str, engine: Any) -> dict:
    """Load the stage's latest committed checkpoint into ``engine`` (``run.resume: auto``)."""
    folder = ckpt_dir(run, stage)
    tag = dist.decide(lambda: latest_tag(folder), run.ctx) if run.cfg.run.resume == "auto" else None
    if tag is None:
        return {"micro": 0, "complete": False}
    client = load_checkpoint(engine, ckpt_dir(run, stage), tag, run.ctx)
    run.say(f"{stage}: resumed from checkpoint {tag} (micro-step {client.get('micro', 0)})")
    return {"micro": int(client.get("micro", 0)), "complete": bool(client.get("complete"))}


def log_train(run: Run, stage: str, engine: Any, losses: list[torch.Tensor], bar: Any) -> None:
    """Mean loss since the last log, averaged over ranks (a collective at the same micro-step
    on every rank), to TensorBoard and the progress bar."""
    local = torch.stack([x.float().cpu() for x in losses]).mean().to(torch.float64)
    loss = float(dist.all_reduce_sum(local, run.ctx)) / run.ctx.world_size
    step = engine.global_steps
    run.tb.scalar(f"{stage}/train/loss", loss, step)
    run.tb.scalar(f"{stage}/train/lr", current_lr(engine), step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{current_lr(engine):.2e}")
    losses.clear()


# ----------------------------------------------------------------------------- stage 1


def stage1_select(run: Run, engine: Any, tok: Any) -> tuple[Selection, list[str], list[str]]:
    """Teacher selection on the unlabeled corpus with views dealt across ranks; vote counts
    and confidence sums are all-reduced inside ``select_from_views``."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    corpus = task.unlabeled
    T = len(task.languages)
    views = parallel_views(corpus, task.languages)
    idx, probs = predict_probs(
        engine, tok, views, ctx, cfg.selection.batch_size, cfg.model.max_length,
        "stage 1 (selection)", cfg.log.progress, view_langs(run, len(views)),
    )  # fmt: skip
    sel = select_from_views(
        probs, idx // T, idx % T, len(corpus), task.languages,
        threshold=cfg.selection.threshold, reduce=dist.reducer(ctx),
    )  # fmt: skip
    teachers, students = sel.teachers, sel.students
    if not teachers and cfg.selection.teachers is None:
        best = max(float(x) for x in sel.scores)
        raise RuntimeError(
            f"stage 1: no language reached selection.threshold={sel.threshold:g} "
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
    run.say(f"stage 1: theta={sel.threshold:.4f} teachers={teachers} students={students}")
    return sel, teachers, students


# ----------------------------------------------------------------------------- stage 2


def local_languages(languages: list[str], ctx: dist.DistContext) -> list[str]:
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
    log_probs = dist.gather_views(local, run.ctx)[:, : len(langs)]  # [B, T, C]
    loss = pair_kl_loss(
        log_probs, langs, teachers,
        pairs=d.pairs, direction=d.direction, detach_teacher=d.detach_teacher,
    )  # fmt: skip
    engine.backward(loss)
    engine.step()
    return loss.detach()


class DevMonitor:
    """Stage 2's dev checks -> the collapse guard (:mod:`alsace_ds.guard`): TensorBoard
    curves, ``distill_guard.json`` (its state, for resume and the report), the best healthy
    model exported to ``distill/best``, and the early-stop decision."""

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
        if run.cfg.run.resume == "auto":  # rank 0 reads the saved state, every rank gets it
            path = self.path
            state = dist.decide(lambda: json.loads(path.read_text()) if path.is_file() else None,
                                run.ctx)  # fmt: skip
            if state is not None:
                self.guard.load(state["guard"])
                self.reference = torch.tensor(state["reference"], dtype=torch.long)

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> bool:
        task = self.run.task
        T = len(task.languages)
        sums = monitor_sums(
            dev.probs, dev.idx // T, dev.idx % T, len(task.dev), T, task.dev.labels()
        )  # fmt: skip
        sums = {k: dist.all_reduce_sum(v, self.run.ctx) for k, v in sums.items()}
        metrics, pred = monitor_metrics(sums, task.languages, task.english, self.reference)
        if self.reference is None:
            self.reference = pred
        verdict = self.guard.check(metrics, step)
        self._log(metrics, verdict, step)
        if verdict["improved"] and step > 0 and self.run.cfg.distill.keep_best:
            export_hf(engine, tok, self.best_dir, self.run.ctx)
        if verdict["problems"]:
            for p in verdict["problems"]:
                self.run.say(f"GUARD step {step}: {p}")
        self.stopped_early = verdict["stop"]
        if self.run.ctx.is_main:
            state = {"guard": self.guard.state(), "reference": self.reference.tolist()}
            atomic_write_json(self.path, state)
        if verdict["stop"]:
            self.run.say(f"GUARD: stopping stage 2 early at step {step}")
        return verdict["stop"] and self.run.cfg.distill.guard

    def _log(self, m: dict, verdict: dict, step: int) -> None:
        tb = self.run.tb
        if "english_accuracy" in m:
            tb.scalar("stage2/guard/english_dev_accuracy", m["english_accuracy"], step)
        tb.scalars("stage2/guard/mean_prediction_entropy_bits",
                   m["mean_prediction_entropy_bits"], step)  # fmt: skip
        tb.scalars("stage2/guard/agreement_with_start", m["agreement_with_start"], step)
        tb.scalar("stage2/guard/consistency", m["consistency"], step)
        tb.scalar("stage2/guard/healthy", float(verdict["healthy"]), step)

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


STAGE2_NAMES = {"alsace": "self-distillation", "english_self_training": "English self-training"}


def stage2_distill(
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
        f"stage 2: {STAGE2_NAMES[d.method]} on {n} parallel examples x {T} languages, {total} "
        f"optimizer steps, lr {d.lr:g} ({d.schedule}): Adam moves a weight by at most the sum "
        f"of the learning rates, {moves.most:.3g}"
        + (f"; the authors' recipe for this pair set ({theirs.pairs} pairs of {len(teachers)} "
           f"teachers, {theirs.steps} steps x lr {theirs.lr:g}) sums to {theirs.lr_sum:.3g}"
           if theirs else "")
    )  # fmt: skip
    moves.warn_if_stuck("distill")
    point = resume_point(run, "distill", engine)
    if point["complete"]:
        return
    if monitor is not None and point["micro"] == 0:
        after_dev(run, engine, tok, "stage2", (teachers, students), monitor)  # the start
    if d.method == "english_self_training":
        step, n = english_self_training_step(run, engine, tok)
        # The same optimizer steps (compute, lr schedule) as ALSACE, over the kept half.
        per_epoch = d.grad_accum * -(-n // (d.micro_batch * ctx.dp_world * d.grad_accum))
        plan = StepPlan(per_epoch, plan.total_micro, plan.grad_accum)
    else:
        step = partial(distill_step, run, engine, tok, teachers=teachers)
    train_loop(
        run, "stage2", engine, tok, plan, n, d, cfg.run.seed + 1000, step,
        point["micro"], roles=(teachers, students), on_dev=monitor,
    )  # fmt: skip
    save_stage(run, "distill", engine, plan.total_micro, complete=True)


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
    dense = dist.all_reduce_sum(dense, run.ctx)  # every rank: all N distributions
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


# Sections whose change makes an old checkpoint meaningless for this run.
RESUME_SECTIONS = ("task", "model", "stage0", "selection", "distill")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new))
            for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} in the run directory, {new!r} now"]


def check_resume(cfg: Config) -> None:
    """Refuse, before any work, to mix a run directory's checkpoints with another setup."""
    run_dir = Path(cfg.run.output_dir)
    has_ckpt = any(latest_tag(run_dir / "checkpoints" / s) for s in ("stage0", "distill"))
    if not has_ckpt:
        return
    if cfg.run.resume == "never":
        raise ConfigError(
            [f"run.output_dir: {run_dir} already holds checkpoints; use run.resume=auto "
             "to continue it, or another output_dir"]
        )  # fmt: skip
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = cfg.to_dict()
    problems = [p for sec in RESUME_SECTIONS for p in _diff(saved.get(sec), now[sec], f"{sec}.")]
    problems += _diff(
        saved["deepspeed"].get("config"), now["deepspeed"]["config"], "deepspeed.config."
    )
    if problems:
        raise ConfigError(
            [f"cannot resume {run_dir} with a different setup ({p})" for p in problems]
            + ["use another run.output_dir (or run.resume=never in a fresh one)"]
        )


def run_pipeline(cfg: Config, task: TaskData, ctx: dist.DistContext) -> dict:
    run_dir = Path(cfg.run.output_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.barrier(ctx)
    run = Run(
        cfg, task, ctx, run_dir, TBLogger(run_dir / "tb", cfg.log.tensorboard and ctx.is_main)
    )
    addr = f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}"
    run.say(
        f"{ctx.world_size} rank(s) on {ctx.device.type} (rank 0: {ctx.device}), rendezvous {addr}"
    )
    torch.manual_seed(cfg.run.seed)
    try:
        report = _run_stages(run)
    finally:
        run.tb.close()
    unlink_own_buffer(ctx.rank)  # after the last collective: every rank has mapped the others'
    return report


def _run_stages(run: Run) -> dict:
    cfg, task, ctx = run.cfg, run.task, run.ctx
    source = task.model_source
    if cfg.stage0.enabled:
        done = run.run_dir / "stage0" / "model" / "config.json"
        resumed = cfg.run.resume == "auto" and dist.decide(done.is_file, ctx)
        source = stage0_source(run) if resumed else stage0_finetune(run)  # exports are atomic
        run.say(f"stage 2 starts from {source}")
    d = cfg.distill
    run.ctx = ctx = dist.with_view_groups(ctx, d.view_parallel_size)
    if ctx.view_size > 1:
        run.say(f"stage 2 layout: {ctx.dp_world} data-parallel group(s) x {ctx.view_size} "
                "rank(s) sharing each example's language views")  # fmt: skip
    ds_cfg = build_ds_config(cfg, d, ctx.world_size)
    scorer, tok, _ = load_scorer_for(run, source, ds_cfg)
    plan = plan_steps(
        len(task.unlabeled), d.micro_batch, ctx.dp_world, d.epochs, d.grad_accum, d.max_steps
    )
    total = plan.total_optimizer_steps
    engine = build_engine(
        scorer, ds_cfg, d.lr, d.weight_decay, total, warmup_steps(total, d.warmup_ratio), d.schedule
    )
    del scorer  # the engine holds the module; release_engine must free the last reference
    moves = Movement.take(run, "stage2", engine, d, total) if d.enabled else None

    before_stats = evaluate(run, engine, tok, task.test, "evaluate (before)")
    sel, teachers, students = stage1_select(run, engine, tok)
    before = summary(run, before_stats, teachers, students)
    log_summary(run, "eval/before", before, 0)

    after, guard = None, None
    changes = {"stage0": _stage0_change(run)}
    if d.enabled:
        checks = task.dev is not None and cfg.eval.every_epoch  # no dev checks: no guard
        monitor = DevMonitor(run, source) if checks and d.guard else None
        stage2_distill(run, engine, tok, teachers, students, monitor, moves)
        steps = engine.global_steps
        best = monitor.best_source(steps) if monitor else None
        if best is not None:  # the guard kept an earlier, healthy model: report that one
            run.say(f"stage 2: the final model is the best healthy check, {best}")
            release_engine(engine)
            del engine
            scorer, tok, _ = load_scorer_for(run, best, ds_cfg)
            engine = build_engine(scorer, ds_cfg, d.lr, d.weight_decay, total, 0)
            del scorer
        after = summary(
            run, evaluate(run, engine, tok, task.test, "evaluate (after)"), teachers, students
        )
        log_summary(run, "eval/after", after, steps)
        final = export_hf(engine, tok, run.run_dir / "final" / "model", ctx)
        changes["stage2"] = moves.report(final, steps)
        guard = monitor.summary(best or "last step") if monitor else None
    release_engine(engine)
    return write_report(run, sel, teachers, students, before, after, guard, changes)


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
    lines = ["## Collapse guard (dev checks of stage 2)", "", head, "|" + "---:|" * cols]
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
    run: Run, sel: Selection, teachers, students, before, after, guard=None, changes=None
) -> dict:
    roles = {x: ("teacher" if x in teachers else "student") for x in run.task.languages}
    warnings = health_warnings(before, after, run.task.english)
    report = {
        "english": run.task.english,
        "languages": run.task.languages,
        "teachers": teachers,
        "students": students,
        "threshold": sel.threshold,
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
        f"students: {', '.join(students) or '–'} (theta = {sel.threshold:.4f}).\n\n{table}"
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
    dist.barrier(run.ctx)
    return report
