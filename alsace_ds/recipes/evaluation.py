"""Evaluation inside a recipe: label distributions of a corpus's views (dealt across ranks),
per-language sums all-reduced into accuracies, TensorBoard curves, and the dev checks that
training stages run (their decisions use English dev accuracy only: no target labels)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from alsace_ds import parallel
from alsace_ds.data.corpus import ParallelCorpus
from alsace_ds.data.tokens import TokenizedCorpus
from alsace_ds.engine.trainer import predict_probs
from alsace_ds.io import atomic_write_bytes
from alsace_ds.method.metrics import accuracy_counts, summarize
from alsace_ds.recipes.run import Run


def view_lang_ids(run: Run, corpus: TokenizedCorpus) -> torch.Tensor | None:
    """``[V]`` label-word table row of each of the corpus's views (its language's index in
    ``prompt_languages``); None for the classification head."""
    if run.task.label_words is None:
        return None
    rows = torch.tensor([run.task.lang_id(x) for x in corpus.languages], dtype=torch.long)
    return rows.repeat(corpus.num_examples)  # example-major: view v is language v % T


def predict_corpus(
    run: Run, engine: Any, corpus: TokenizedCorpus, desc: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (view index ``[V]``, probabilities ``[V, C]``) over the corpus's
    example-major views (view v is example v // T in language v % T)."""
    cfg = run.cfg
    return predict_probs(
        engine, corpus.views, run.ctx, batch_size, desc, cfg.log.progress,
        view_lang_ids(run, corpus),
    )  # fmt: skip


def count_stats(run: Run, corpus: ParallelCorpus, idx: torch.Tensor, probs: torch.Tensor) -> dict:
    """Per-language sums (correct, count, prediction histogram, probability sum), all-reduced."""
    T = len(run.task.languages)
    labels = corpus.labels()[idx // T]
    stats = accuracy_counts(probs, labels, idx % T, T)
    return {k: parallel.all_reduce_sum(v, run.ctx) for k, v in stats.items()}


def split_of(run: Run, split: str) -> tuple[ParallelCorpus, TokenizedCorpus]:
    """The task's ``"dev"`` or ``"test"`` corpus and its tokens."""
    return getattr(run.task, split), getattr(run.tokens, split)


def evaluate(run: Run, engine: Any, split: str, desc: str, name: str) -> dict:
    """Reduced per-language sums over all ranks (:func:`count_stats`) on the ``split``
    corpus; every example's per-language distribution is kept in
    ``predictions/<name>.safetensors``."""
    corpus, toks = split_of(run, split)
    idx, probs = predict_corpus(run, engine, toks, desc, run.cfg.eval.batch_size)
    save_predictions(run, name, corpus, idx, probs)
    return count_stats(run, corpus, idx, probs)


def predictions_path(run_dir, name: str):
    return run_dir / "predictions" / f"{name}.safetensors"


def save_predictions(
    run: Run, name: str, corpus: ParallelCorpus, idx: torch.Tensor, probs: torch.Tensor
) -> None:
    """``probs`` ``[N, T, C]`` and ``labels`` ``[N]`` of the corpus (languages, ids and file in
    the metadata), so tables and intervals can be recomputed without the model."""
    languages = run.task.languages
    N, T, C = len(corpus), len(languages), probs.shape[-1]
    dense = parallel.assemble_rows(idx, probs, N * T, run.ctx, torch.float32)  # example-major
    if run.ctx.is_main:
        tensors = {"probs": dense.view(N, T, C).contiguous(), "labels": corpus.labels()}
        meta = {"languages": json.dumps(languages), "ids": json.dumps(corpus.ids),
                "file": str(corpus.path)}  # fmt: skip
        atomic_write_bytes(predictions_path(run.run_dir, name), safetensors_bytes(tensors, meta))


def summary(run: Run, stats: dict, teachers: list[str], students: list[str]) -> dict:
    return summarize(
        run.task.languages,
        stats["correct"],
        stats["count"],
        run.task.english,
        teachers,
        students,
        stats["pred_hist"],
        stats.get("prob_sum"),
    )  # fmt: skip  (an earlier attempt's results/*.json may predate prob_sum)


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


@dataclass(frozen=True)
class DevResult:
    summ: dict  # accuracies etc. (all-reduced)
    idx: torch.Tensor  # this rank's view indices [V]
    probs: torch.Tensor  # [V, C]


def dev_check(
    run: Run, engine: Any, tok: Any, stage: str, step: int, roles=None
) -> DevResult | None:
    """Per-language dev accuracy during training, logged as curves; None when the task has
    no dev set or ``eval.every_epoch`` is off."""
    dev, toks = split_of(run, "dev")
    if dev is None or not run.cfg.eval.every_epoch:
        return None
    idx, probs = predict_corpus(run, engine, toks, f"{stage} dev", run.cfg.eval.batch_size)
    teachers, students = roles or (run.task.languages, [])
    summ = summary(run, count_stats(run, dev, idx, probs), teachers, students)
    log_summary(run, f"{stage}/dev", summ, step)
    avg = summ["averages"]["all"]
    en = run.task.english
    head = f"{en}={summ['accuracy'][en]:.2f} " if en else ""
    gap = f" avg gap={avg['gap']:.2f}" if avg["gap"] is not None else ""
    run.say(f"{stage} step {step}: dev acc {head}avg={avg['accuracy']:.2f}{gap}")
    return DevResult(summ, idx, probs)
