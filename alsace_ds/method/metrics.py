"""Evaluation math and reports: per-language accuracy, transfer gap, group averages.

Pure functions (tensor/dict in, tensor/dict out). Counting returns sums and counts so
that the caller can all-reduce them across ranks (``alsace_ds.parallel``) before dividing.

Definitions (paper Tables 2-4): accuracy in percent; the transfer gap of language t is
``Delta_t = acc_en - acc_t``; a group's average gap is taken over its non-English
languages only (English has gap 0 by definition). Accuracy is always reported beside the
gap: a smaller gap bought with lower accuracy (e.g. a collapse to one label) is a failure.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def accuracy_counts(
    preds: Tensor, labels: Tensor, lang_idx: Tensor, num_languages: int, num_classes: int
) -> dict[str, Tensor]:
    """Per-language sums for the local views.

    preds, labels, lang_idx: ``[V]`` long. Returns float64 tensors: ``correct`` ``[T]``,
    ``count`` ``[T]`` and ``pred_hist`` ``[T, C]`` (how often each label was predicted,
    which shows a collapse toward one label).
    """
    correct = torch.zeros(num_languages, dtype=torch.float64)
    count = torch.zeros(num_languages, dtype=torch.float64)
    correct.index_add_(0, lang_idx, (preds == labels).to(torch.float64))
    count.index_add_(0, lang_idx, torch.ones_like(lang_idx, dtype=torch.float64))
    hist = torch.zeros(num_languages * num_classes, dtype=torch.float64)
    hist.index_add_(0, lang_idx * num_classes + preds, torch.ones_like(preds, dtype=torch.float64))
    return {"correct": correct, "count": count, "pred_hist": hist.view(num_languages, num_classes)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def entropy_bits(dist: list[float]) -> float:
    """Entropy (bits) of a label histogram; log2(C) = uniform, 0 = every prediction the same."""
    total = sum(dist)
    return -sum((p / total) * math.log2(p / total) for p in dist if p > 0) if total else 0.0


def summarize(
    languages: list[str],
    correct: Tensor,
    count: Tensor,
    english: str | None,
    teachers: list[str],
    students: list[str],
    pred_hist: Tensor | None = None,
) -> dict:
    """Accuracy (%), gap to English and averages over all / teachers / students.
    ``english=None`` (a task without an English view, e.g. XCOPA): gaps are None."""
    acc = {lang: 100.0 * float(correct[i] / count[i]) for i, lang in enumerate(languages)}
    gap = {lang: None if english is None else acc[english] - acc[lang] for lang in languages}
    out: dict = {"accuracy": acc, "gap": gap, "num_examples": int(count.max().item())}
    groups = {"all": languages, "teachers": teachers, "students": students}
    out["averages"] = {
        name: {
            "accuracy": _mean([acc[x] for x in members]),
            "gap": None if english is None else _mean([gap[x] for x in members if x != english]),
            "languages": list(members),
        }
        for name, members in groups.items()
    }
    if pred_hist is not None:
        out["prediction_entropy_bits"] = {
            lang: entropy_bits(pred_hist[i].tolist()) for i, lang in enumerate(languages)
        }
    return out


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def markdown_table(before: dict, after: dict | None, roles: dict[str, str]) -> str:
    """Per-language rows then the group averages, before -> after (Table 2/3 layout)."""
    head = "| language | role | acc before | acc after | Δacc | gap before | gap after |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    after = after or {}
    for lang, acc_b in before["accuracy"].items():
        acc_a = after.get("accuracy", {}).get(lang)
        gap_b, gap_a = before["gap"][lang], after.get("gap", {}).get(lang)
        delta = None if acc_a is None else acc_a - acc_b
        lines.append(
            f"| {lang} | {roles.get(lang, '')} | {_fmt(acc_b)} | {_fmt(acc_a)} | "
            f"{_fmt(delta, True)} | {_fmt(gap_b)} | {_fmt(gap_a)} |"
        )
    for name, avg_b in before["averages"].items():
        avg_a = after.get("averages", {}).get(name, {})
        acc_a = avg_a.get("accuracy")
        delta = None if acc_a is None or avg_b["accuracy"] is None else acc_a - avg_b["accuracy"]
        lines.append(
            f"| **avg {name}** ({len(avg_b['languages'])}) | | {_fmt(avg_b['accuracy'])} | "
            f"{_fmt(acc_a)} | {_fmt(delta, True)} | {_fmt(avg_b['gap'])} | "
            f"{_fmt(avg_a.get('gap'))} |"
        )
    return "\n".join(lines) + "\n"
