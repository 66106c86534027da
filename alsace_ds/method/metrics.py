"""Evaluation math and reports: per-language accuracy, transfer gap, group averages.

Pure functions (tensor/dict in, tensor/dict out). Counting returns sums and counts so
that the caller can all-reduce them across ranks (``alsace_ds.parallel``) before dividing.

Definitions (paper Tables 2-4): accuracy in percent; the transfer gap of language t is
``Delta_t = acc_en - acc_t``; a group's average gap is taken over its non-English
languages only (English has gap 0 by definition). Accuracy is always reported beside the
gap: a smaller gap bought with lower accuracy (e.g. a collapse to one label) is a failure.

A collapse is measured by ``mean_prediction_entropy_bits``: the entropy of each language's
MEAN predicted distribution (the collapse guard's quantity, :mod:`alsace_ds.method.guard`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def per_language_sum(values: Tensor, lang_idx: Tensor, num_languages: int) -> Tensor:
    """Sum the rows of ``values`` ``[V, K]`` per language: ``[T, K]`` float64 on
    ``values.device``; row t adds the views whose ``lang_idx`` ``[V]`` is t.

    Sums (never means): ranks that hold different views all-reduce them before dividing.
    float64 keeps counts exact up to 2**53.
    """
    if values.dim() != 2:
        raise ValueError(f"values must have shape [V, K], got {list(values.shape)}")
    out = torch.zeros(num_languages, values.shape[1], dtype=torch.float64, device=values.device)
    return out.index_add_(0, lang_idx.long().to(values.device), values.to(torch.float64))


def accuracy_counts(
    probs: Tensor, labels: Tensor, lang_idx: Tensor, num_languages: int
) -> dict[str, Tensor]:
    """Per-language sums for the local views.

    probs ``[V, C]`` (label distributions); labels, lang_idx ``[V]`` long. The prediction is
    ``probs.argmax(-1)``. Returns float64 sums: ``correct`` ``[T]``, ``count`` ``[T]``,
    ``pred_hist`` ``[T, C]`` (how often each label was predicted) and ``prob_sum`` ``[T, C]``
    (the summed distributions: divided by ``count`` it is the mean prediction, whose entropy
    shows a collapse toward one label).
    """
    num_classes = probs.shape[-1]
    preds = probs.argmax(-1)  # [V]
    columns = torch.cat(
        [
            (preds == labels).to(torch.float64)[:, None],  # [V, 1] correct
            torch.ones(len(preds), 1, dtype=torch.float64, device=probs.device),  # [V, 1]
            torch.nn.functional.one_hot(preds, num_classes).to(torch.float64),  # [V, C]
            probs.to(torch.float64),  # [V, C]
        ],
        dim=1,
    )  # [V, 2 + 2C]
    sums = per_language_sum(columns, lang_idx, num_languages)  # [T, 2 + 2C]
    return {
        "correct": sums[:, 0].contiguous(),
        "count": sums[:, 1].contiguous(),
        "pred_hist": sums[:, 2 : 2 + num_classes].contiguous(),
        "prob_sum": sums[:, 2 + num_classes :].contiguous(),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def entropy_bits(weights: Tensor | Sequence[float]) -> float:
    """Entropy (bits) of the distribution proportional to ``weights`` ``[C]`` (a label
    histogram, a summed or a mean distribution): log2(C) = uniform, 0 = one label (also
    when every weight is 0)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    total = w.sum()
    if total <= 0:
        return 0.0
    p = w[w > 0] / total
    return max(0.0, float(-(p * p.log2()).sum()))  # max: no "-0.00" in messages


def summarize(
    languages: list[str],
    correct: Tensor,
    count: Tensor,
    english: str | None,
    teachers: list[str],
    students: list[str],
    pred_hist: Tensor | None = None,
    prob_sum: Tensor | None = None,
) -> dict:
    """Accuracy (%), gap to English and averages over all / teachers / students.
    ``english=None`` (a task without an English view, e.g. XCOPA): gaps are None.

    With ``prob_sum`` ``[T, C]``: ``mean_prediction_entropy_bits`` per language (entropy of
    the mean predicted distribution, what :func:`alsace_ds.method.guard.collapse_warnings`
    compares). With ``pred_hist`` ``[T, C]``: ``prediction_entropy_bits`` (entropy of the
    argmax histogram; for reading only).
    """
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
            lang: entropy_bits(pred_hist[i]) for i, lang in enumerate(languages)
        }
    if prob_sum is not None:
        out["mean_prediction_entropy_bits"] = {
            lang: entropy_bits(prob_sum[i]) for i, lang in enumerate(languages)
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
