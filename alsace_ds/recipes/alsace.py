"""The ALSACE recipe: setup -> stage 0 (English fine-tuning) -> selection (teacher
languages) -> distill (cross-lingual self-distillation) -> evaluate before and after.

Outputs, all under ``run.output_dir`` and written atomically: ``config.yaml`` (resolved),
``selection.json``, ``report.json`` / ``report.md`` / ``table{2,3}.csv``,
``checkpoints/<stage>/`` (DeepSpeed), ``stage0/model`` and ``final/model`` (plain Hugging
Face folders), ``predictions/{test,dev}_{before,after}.safetensors`` (every example's
per-language distributions), ``self_training.json`` (the self-training baselines' kept
pseudo-labels per language), ``results/`` (finished results an interrupted run reuses) and
``tb/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from alsace_ds import parallel
from alsace_ds.config import Config
from alsace_ds.data.tasks import TaskData
from alsace_ds.engine import checkpoint, rundir
from alsace_ds.engine.schedules import authors_update
from alsace_ds.engine.trainer import (
    cross_entropy_step,
    export_hf,
    plan_steps,
    release_engine,
    to_device,
)
from alsace_ds.io import atomic_write_json, atomic_write_text
from alsace_ds.method.ensemble import ensemble_accuracies
from alsace_ds.method.selection import select_from_views
from alsace_ds.method.stats import avg_accuracy, avg_gap, paired_bootstrap
from alsace_ds.recipes.callbacks import BestKeeper, DevMonitor, after_dev
from alsace_ds.recipes.evaluation import (
    evaluate,
    log_summary,
    predict_corpus,
    predictions_path,
    summary,
)
from alsace_ds.recipes.loop import Commits, Movement, StageRun, train_loop
from alsace_ds.recipes.run import Run, build_tokens, make_engine, set_matmul_precision
from alsace_ds.recipes.strategies import DISTILL_METHODS, apply_selection_rule
from alsace_ds.reporting import report as reporting
from alsace_ds.reporting.tb import TBLogger


def run_alsace(cfg: Config, task: TaskData, ctx: parallel.ParallelContext) -> dict:
    """The whole run; returns ``report.json``'s content. Finished results of an earlier
    attempt (``results/*.json``, the stage-0 export) are reused, never redone."""
    run = setup(cfg, task, ctx)
    commits = Commits(run)
    try:
        source = stage0(run, commits)
        model = StartModel(run, source)  # built once, only if some result below is missing
        before = _result(run, "before", lambda: model.evaluate("evaluate (before)", "test_before"))
        dev_predictions(run, model, "before")
        sel = _result(run, "selection", lambda: run_selection(run, *model.get()))
        roles = sel["teachers_used"], sel["students_used"]
        before = summary(run, _stats_of(before), *roles)
        log_summary(run, "eval/before", before, 0)
        after, final = None, None
        if cfg.distill.enabled:
            final = _result(run, "final", lambda: distill_and_evaluate(run, commits, model, roles))
            after = summary(run, _stats_of(final["after"]), *roles)
            log_summary(run, "eval/after", after, final["steps"])
        model.release()
        return write_report(run, sel["threshold"], roles, before, after, final)
    finally:
        run.tb.close()


def setup(cfg: Config, task: TaskData, ctx: parallel.ParallelContext) -> Run:
    run_dir = Path(cfg.run.output_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    parallel.barrier(ctx)
    tokens = build_tokens(cfg, task, ctx, run_dir)  # every view tokenized once, cached
    tb = TBLogger(run_dir / "tb", cfg.log.tensorboard and ctx.is_main)
    run = Run(cfg, task, ctx, run_dir, tb, tokens)
    addr = f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}"
    run.say(
        f"{ctx.world_size} rank(s) on {ctx.device.type} (rank 0: {ctx.device}), rendezvous {addr}"
    )
    if ctx.view_size > 1:
        run.say(f"distill layout: {ctx.dp_world} data-parallel group(s) x {ctx.view_size} "
                "rank(s) sharing each example's language views")  # fmt: skip
    set_matmul_precision(cfg, ctx)
    torch.manual_seed(cfg.run.seed)  # model initialisation: the same on every rank
    return run


def _result(run: Run, name: str, compute) -> Any:
    """``results/<name>.json`` of an earlier attempt of this run, else ``compute()`` saved
    there as soon as it is done."""
    value = None
    if run.cfg.run.resume == "auto":
        value = rundir.load_result(run.run_dir, name, run.ctx)
    if value is not None:
        run.say(f"{name}: reusing the result of an earlier attempt (results/{name}.json)")
        return value
    value = compute()
    rundir.save_result(run.run_dir, name, value, run.ctx)
    return value


def _stats_json(stats: dict[str, torch.Tensor]) -> dict:
    return {k: v.tolist() for k, v in stats.items()}


def _stats_of(saved: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()}


# ----------------------------------------------------------------------------- stage 0


def stage0(run: Run, commits: Commits) -> str:
    """The model distill starts from: stage 0's (trained now, or exported by an earlier
    attempt: exports are atomic), or the configured model when stage 0 is off."""
    if not run.cfg.stage0.enabled:
        source = run.task.model_source
    else:
        exported = parallel.decide(partial(rundir.stage0_exported, run.run_dir), run.ctx)
        source = stage0_source(run) if exported else run_stage0(run, commits)
    run.say(f"distill starts from {source}")
    return source


def run_stage0(run: Run, commits: Commits) -> str:
    """English fine-tuning, then the export of ``stage0/model``; returns :func:`stage0_source`."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    st, train = cfg.stage0, task.train
    plan = plan_steps(len(train), st.micro_batch, ctx.world_size, st.epochs, st.grad_accum,
                      st.max_steps)  # fmt: skip
    total = plan.total_optimizer_steps
    engine, tok, warnings = make_engine(run, "stage0", task.model_source, total)
    for w in warnings:
        run.say(f"warning: {w}")
    checkpoint.seed_rank(cfg.run.seed, ctx.rank)  # per-rank dropout; a resume restores RNG
    moves = Movement.take(run, "stage0", engine, st, total)
    moves.warn_if_stuck()
    zero = engine.zero_optimization_stage()
    run.say(
        f"stage 0: English fine-tuning on {len(train)} examples, {total} optimizer steps "
        f"(ZeRO-{zero}, {ctx.world_size} rank(s))"
    )
    step = stage0_step(run, engine)
    best = BestKeeper.for_stage0(run)
    point = commits.resume("stage0", engine, best)
    if not point["complete"]:
        shard = (ctx.rank, ctx.world_size)  # stage 0: every rank its own examples
        stage = StageRun("stage0", st, plan, len(train), shard, cfg.run.seed, step)
        train_loop(run, commits, stage, engine, tok, point, on_dev=best)
        commits.save("stage0", engine, plan.total_micro, complete=True, on_dev=best)
    out = run.run_dir / "stage0" / "model"
    made_by = partial(rundir.write_provenance, cfg=cfg)
    change = moves.report(export_hf(engine, tok, out, ctx, made_by), engine.global_steps)
    if ctx.is_main:
        atomic_write_json(run.run_dir / "stage0" / "param_change.json", change)
    run.say(f"stage 0 done: model exported to {out}")
    release_engine(engine)
    return stage0_source(run)


def stage0_step(run: Run, engine: Any) -> Callable[[list[int]], torch.Tensor]:
    """Stage 0's micro-step: cross-entropy on the English training views at the batch's
    example indices (view i of the training tokens is example i)."""
    task, ctx = run.task, run.ctx
    labels, views = task.train.labels(), run.tokens.train.views
    rows = None  # [B] every view's label-word row: the same every step, on the device once
    if task.label_words is not None:
        lang = task.lang_id(task.train_language)
        rows = to_device(torch.full((run.cfg.stage0.micro_batch,), lang), ctx.device)

    def step(batch: list[int]) -> torch.Tensor:
        return cross_entropy_step(engine, views, batch, labels[batch], ctx.device, rows)

    return step


def stage0_source(run: Run) -> str:
    """The stage-0 model that distill starts from: the best by dev accuracy when one was
    kept (``stage0.keep_best``), else the last."""
    best = run.run_dir / "stage0" / "best"
    keep = run.cfg.stage0.keep_best and parallel.decide((best / "config.json").is_file, run.ctx)
    return str(best) if keep else str(run.run_dir / "stage0" / "model")


class StartModel:
    """The distill engine around the start model, shared by the evaluation before, the
    selection and distill; built on first use (a resumed run with every result kept never
    loads it)."""

    def __init__(self, run: Run, source: str) -> None:
        self.run, self.source = run, source
        d, ctx = run.cfg.distill, run.ctx
        n = len(run.task.unlabeled)
        self.plan = plan_steps(n, d.micro_batch, ctx.dp_world, d.epochs, d.grad_accum, d.max_steps)
        self.engine = self.tok = self.moves = None

    def get(self) -> tuple[Any, Any]:
        if self.engine is None:
            run, total = self.run, self.plan.total_optimizer_steps
            self.engine, self.tok, _ = make_engine(run, "distill", self.source, total)
            checkpoint.seed_rank(run.cfg.run.seed + 1000, run.ctx.rank)
            if run.cfg.distill.enabled:
                self.moves = Movement.take(run, "distill", self.engine, run.cfg.distill, total)
        return self.engine, self.tok

    def evaluate(self, desc: str, name: str, split: str = "test") -> dict:
        """Per-language sums on the ``split`` corpus; the predictions are kept in
        ``predictions/<name>.safetensors``."""
        return _stats_json(evaluate(self.run, self.get()[0], split, desc, name))

    def replace(self, source: str) -> None:
        """Swap in the model at ``source`` (the guard's best check) for evaluation/export."""
        self.release()
        self.engine, self.tok, _ = make_engine(
            self.run, "distill", source, self.plan.total_optimizer_steps
        )

    def release(self) -> None:
        if self.engine is not None:
            release_engine(self.engine)
            self.engine = None


def dev_predictions(run: Run, model: StartModel, when: str) -> None:
    """``predictions/dev_<when>.safetensors`` (every dev example in every language) of the
    model now in ``model``; its sums kept in ``results/dev_<when>.json`` (a resumed run does
    not redo them). Nothing without a dev set or with ``eval.dev_predictions`` off."""
    dev = run.task.dev
    if dev is not None and run.cfg.eval.dev_predictions:
        name = f"dev_{when}"
        _result(run, name, lambda: model.evaluate(f"evaluate dev ({when})", name, "dev"))


# ----------------------------------------------------------------------------- selection


def run_selection(run: Run, engine: Any, tok: Any) -> dict:
    """Teacher selection on the unlabeled corpus with views dealt across ranks; vote counts
    and confidence sums are all-reduced inside ``select_from_views``. Returns what
    ``selection.json`` holds (``teachers_used`` / ``students_used``: after the rule)."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    corpus, T = task.unlabeled, len(task.languages)
    run.say(f"selection: label distributions of {len(corpus) * T} unlabeled views")
    toks = run.tokens.unlabeled
    idx, probs = predict_corpus(run, engine, toks, "selection", cfg.selection.batch_size)
    sel = select_from_views(
        probs, idx // T, idx % T, len(corpus), task.languages,
        threshold=cfg.selection.threshold, reduce=parallel.reducer(ctx),
    )  # fmt: skip
    teachers, students, rule = apply_selection_rule(sel, task.languages, cfg)
    for i, lang in enumerate(task.languages):
        run.tb.scalar(f"selection/s_t/{lang}", float(sel.confidence[i]), 0)
        run.tb.scalar(f"selection/shat_t/{lang}", float(sel.scores[i]), 0)
        run.tb.scalar(f"selection/agreement/{lang}", float(sel.agreement[i]), 0)
    out = sel.to_dict()
    out.update(corpus=corpus.path, override=cfg.selection.teachers, teachers_used=teachers,
               students_used=students, **rule)  # fmt: skip
    if ctx.is_main:
        atomic_write_json(run.run_dir / "selection.json", out)
    run.say(f"selection: theta={sel.threshold:.4f} teachers={teachers} students={students}")
    return out


# ----------------------------------------------------------------------------- distill


def distill_and_evaluate(run: Run, commits: Commits, model: StartModel, roles) -> dict:
    """Distill, the guard's choice of final model, its evaluation (kept in
    ``results/after.json`` as soon as it is done) and its export to ``final/model``."""
    cfg, task = run.cfg, run.task
    engine, tok = model.get()
    checks = task.dev is not None and cfg.eval.every_epoch  # no dev checks: no guard
    monitor = DevMonitor(run, model.source) if checks and cfg.distill.guard else None
    run_distill(run, commits, model, roles, monitor)
    steps = model.engine.global_steps
    best = monitor.best_source(steps) if monitor else None
    if best is not None:  # the guard kept an earlier, healthy model: report that one
        run.say(f"distill: the final model is the best healthy check, {best}")
        model.replace(best)
    after = _result(run, "after", lambda: model.evaluate("evaluate (after)", "test_after"))
    dev_predictions(run, model, "after")
    made_by = partial(rundir.write_provenance, cfg=cfg)
    exported = export_hf(*model.get(), run.run_dir / "final" / "model", run.ctx, made_by)
    return {
        "after": after,
        "steps": steps,
        "change": model.moves.report(exported, steps),  # rank 0's; saved by rank 0
        "guard": monitor.summary(best or "last step") if monitor else None,
        "self_training": _self_training_record(run),
    }


def _self_training_record(run: Run) -> dict | None:
    """``self_training.json`` (kept pseudo-labels per language) when the method wrote one;
    rank 0's (it wrote it), like the parameter change."""
    path = run.run_dir / "self_training.json"
    return json.loads(path.read_text()) if run.ctx.is_main and path.is_file() else None


def run_distill(
    run: Run, commits: Commits, model: StartModel, roles, monitor: DevMonitor | None
) -> None:
    cfg, ctx = run.cfg, run.ctx
    d, engine, tok = cfg.distill, *model.get()
    teachers, _ = roles
    n, T = len(run.task.unlabeled), len(run.task.languages)
    plan, moves = model.plan, model.moves
    theirs = authors_update(T, len(teachers), n) if teachers else None
    if moves.bound is not None and theirs is not None:
        moves.bound["authors_equivalent"] = dataclasses.asdict(theirs)
    method = DISTILL_METHODS[d.method]
    run.say(
        f"distill: {method.title} on {n} parallel examples x {T} languages, "
        f"{plan.total_optimizer_steps} optimizer steps, lr {d.lr:g} ({d.schedule}): Adam moves "
        f"a weight by at most the sum of the learning rates, {moves.most:.3g}"
        + (f"; the authors' recipe for this pair set ({theirs.pairs} pairs of {len(teachers)} "
           f"teachers, {theirs.steps} steps x lr {theirs.lr:g}) sums to {theirs.lr_sum:.3g}"
           if theirs else "")
    )  # fmt: skip
    moves.warn_if_stuck()
    point = commits.resume("distill", engine, monitor)
    if point["complete"]:
        return
    if monitor is not None and point["micro"] == 0:
        after_dev(run, engine, tok, "distill", roles, monitor)  # the start
    step, n, plan = method.build(run, engine, tok, teachers, plan)
    shard = (ctx.dp_rank, ctx.dp_world)  # a view group shares its examples
    stage = StageRun("distill", d, plan, n, shard, cfg.run.seed + 1000, step, roles)
    train_loop(run, commits, stage, engine, tok, point, on_dev=monitor)
    commits.save("distill", engine, plan.total_micro, complete=True, on_dev=monitor)


# ----------------------------------------------------------------------------- report


def _stage0_record(run: Run, name: str) -> dict | None:
    """A JSON record stage 0 kept beside its model (a resumed run skips the stage)."""
    info = run.run_dir / "stage0" / name
    if not (run.cfg.stage0.enabled and info.is_file()):
        return None
    return json.loads(info.read_text())


def _correct(path: Path) -> torch.Tensor:
    """``[N, T]`` bool: each test example right in each language, from saved predictions."""
    saved = load_file(str(path))
    return saved["probs"].argmax(-1) == saved["labels"][:, None]


def _intervals(run: Run) -> dict | None:
    """after - before on the same test examples, with 95% paired bootstrap intervals, for
    the average accuracy and (with a reference language) the average gap."""
    paths = [predictions_path(run.run_dir, n) for n in ("test_before", "test_after")]
    if not all(p.is_file() for p in paths):
        return None
    a, b = (_correct(p) for p in paths)
    langs, en = run.task.languages, run.task.english
    stats = {"avg_accuracy": avg_accuracy(range(len(langs)))}
    if en is not None:
        e = langs.index(en)
        stats["avg_gap"] = avg_gap(e, [t for t in range(len(langs)) if t != e])
    out = {}
    for key, stat in stats.items():
        iv = paired_bootstrap(a, b, stat, seed=run.cfg.run.seed)
        unit = " points" if key == "avg_gap" else " points of accuracy"
        out[key] = {**dataclasses.asdict(iv), "covers_zero": iv.covers_zero,
                    "text": iv.describe(unit)}  # fmt: skip
    return out


def _ensembles(run: Run, distilled: bool) -> dict | None:
    """Test accuracy of each test-time ensemble rule (paper Figure 4) before and (when
    distill ran) after, from the saved test predictions and the selection's shat_t."""
    sel_path = run.run_dir / "selection.json"
    names = ("before", "after") if distilled else ("before",)
    paths = {n: predictions_path(run.run_dir, f"test_{n}") for n in names}
    if not sel_path.is_file() or not all(p.is_file() for p in paths.values()):
        return None
    langs, en = run.task.languages, run.task.english
    per_lang = json.loads(sel_path.read_text())["languages"]
    weights = torch.tensor([per_lang[x]["shat_t"] for x in langs], dtype=torch.float64)  # [T]
    english = langs.index(en) if en is not None else None
    out = {}
    for name, path in paths.items():
        saved = load_file(str(path))  # probs [N, T, C], labels [N]
        out[name] = ensemble_accuracies(saved["probs"], saved["labels"], weights, english)
    return out


def write_report(run: Run, threshold: float, roles, before, after, final) -> dict:
    cfg = run.cfg
    changes = {"stage0": _stage0_record(run, "param_change.json") if run.ctx.is_main else None}
    if final is not None:
        changes["distill"] = final["change"]
    out = reporting.Outcome(
        threshold, *roles, before, after,
        guard=final["guard"] if final else None, changes=changes,
        stage0_start=_stage0_record(run, "best.json") if cfg.stage0.keep_best else None,
        intervals=_intervals(run) if run.ctx.is_main and final is not None else None,
        ensembles=_ensembles(run, final is not None) if run.ctx.is_main else None,
    )  # fmt: skip
    model_name = cfg.model.name_or_path.rstrip("/").split("/")[-1]
    d = cfg.distill
    report, md, tables = reporting.render(
        run.task, model_name, d.method, out, d.guard_max_en_drop, d.guard_min_entropy_ratio
    )
    if run.ctx.is_main:
        atomic_write_json(run.run_dir / "report.json", report)
        md += _figures(run, report) if cfg.log.plots else ""
        atomic_write_text(run.run_dir / "report.md", md)
        for name, text in reporting.csv_files(tables).items():
            atomic_write_text(run.run_dir / name, text)
        print("\n" + md, flush=True)
    parallel.barrier(run.ctx)
    return report


def _figures(run: Run, report: dict) -> str:
    """Rank 0: ``plots/*.png`` for what the run has data for, each also a TensorBoard image
    (``plots/<name>``); returns report.md's "Figures" section linking them. Matplotlib is
    imported here, by rank 0 of a run that draws: ~0.7 s of every rank's start-up otherwise."""
    from alsace_ds.reporting import plots

    sel = run.run_dir / "selection.json"
    d = run.cfg.distill
    paths = plots.run_plots(
        run.run_dir / "plots", report["before"], report["after"], report["teachers"],
        report["english"], json.loads(sel.read_text()) if sel.is_file() else None,
        report["guard"], d.guard_max_en_drop, d.guard_min_entropy_ratio, d.guard_min_agreement,
    )  # fmt: skip
    for name, path in paths.items():
        run.tb.image(f"plots/{name}", path, 0)
    return plots.figures_markdown(paths, run.run_dir)
