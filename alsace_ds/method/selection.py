"""ALSACE stage 1: teacher-language selection from per-view label distributions.

Pure tensor code: no ``torch.distributed``, no environment reads. Cross-process sums are
injected as a ``reduce`` callable (``Tensor -> Tensor``, summing over processes), so a run
whose views are spread over many ranks gives the same result as one process holding them all.

Definitions (METHOD.md, stage 1), for N examples, T languages and C labels:

1. Per-view prediction ``yhat[t, i] = argmax_c P(c | x[t, i])``. Ties go to the SMALLEST label
   index (implemented explicitly, not left to ``torch.argmax``).
2. Pseudo-label ``y[i] = argmax_c #{t : yhat[t, i] = c}`` (majority vote over languages). Ties
   go to the SMALLEST label index: the vote is ``argmax(counts * C + (C - 1 - c))``, which is
   exact integer arithmetic and therefore identical on every rank.
3. Confidence ``s[t] = mean_i P(y[i] | x[t, i])``.
4. Normalized score ``shat = softmax(s)`` over languages.
5. Threshold ``theta = mean(shat)`` (= 1/T) unless a fixed value is given.
6. Teachers are the languages with ``shat[t] >= theta``, compared with a relative tolerance
   (``shat[t] >= theta * (1 - 1e-9)``) so that floating-point rounding in the softmax cannot
   demote a language whose score equals the threshold: when all confidences are equal every
   language is a teacher. With T = 1 the single language is a teacher.

Everything after the per-view prediction is computed in float64; vote counts are int64.
The distributed form is two all-reduce phases: vote counts ``[N, C]`` (phase 1), then the
per-language sums ``[3, T]`` = (sum of P(pseudo-label), agreement count, view count) (phase 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alsace_ds.method.metrics import per_language_sum

Reduce = Callable[[Tensor], Tensor]

#: Relative tolerance of the teacher test ``shat >= theta * (1 - TEACHER_RTOL)``.
TEACHER_RTOL = 1e-9


@dataclass(frozen=True)
class Selection:
    """Result of teacher-language selection; every field is identical on every rank."""

    languages: list[str]
    pseudo_labels: Tensor  # [N] long, majority vote per example
    confidence: Tensor  # [T] float64, s_t
    scores: Tensor  # [T] float64, shat_t = softmax(s)_t
    threshold: float  # theta
    teachers: list[str]  # in input order
    students: list[str]  # in input order
    agreement: Tensor  # [T] float64, fraction of views whose prediction equals the pseudo-label
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (plain Python floats/strings); pseudo-labels are left out."""
        teachers = set(self.teachers)
        per_lang = {
            lang: {
                "agreement": float(self.agreement[t]),
                "s_t": float(self.confidence[t]),
                "shat_t": float(self.scores[t]),
                "role": "teacher" if lang in teachers else "student",
            }
            for t, lang in enumerate(self.languages)
        }
        return {
            "threshold": float(self.threshold),
            "teachers": list(self.teachers),
            "students": list(self.students),
            "num_examples": int(self.num_examples),
            "languages": per_lang,
        }


def _identity(t: Tensor) -> Tensor:
    return t


def check_languages(languages: Sequence[str]) -> list[str]:
    """The languages as a list; ValueError if empty or duplicated (shared with distill)."""
    langs = list(languages)
    if not langs:
        raise ValueError("languages must not be empty")
    dup = sorted({lang for lang in langs if langs.count(lang) > 1})
    if dup:
        raise ValueError(f"duplicate languages: {dup}")
    return langs


def _check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return value


def _check_probs(probs: Tensor) -> None:
    """Reject NaN/inf/negative probabilities (they would silently corrupt the votes)."""
    if not torch.is_floating_point(probs):
        raise ValueError(f"probs must be a floating-point tensor, got {probs.dtype}")
    if probs.numel() == 0:
        return
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("probs contains non-finite values (NaN or inf)")
    if bool((probs < 0).any()):
        raise ValueError("probs contains negative values")


def _check_index(name: str, idx: Tensor, num_views: int, upper: int) -> None:
    if idx.dim() != 1 or idx.shape[0] != num_views:
        raise ValueError(f"{name} must have shape [{num_views}], got {list(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got {idx.dtype}")
    if num_views and (int(idx.min()) < 0 or int(idx.max()) >= upper):
        raise ValueError(f"{name} values must lie in [0, {upper}), got [{idx.min()}, {idx.max()}]")


def _reduced(reduce: Reduce, t: Tensor) -> Tensor:
    """Apply ``reduce`` and check that it kept shape and dtype (same on every rank)."""
    out = reduce(t)
    if out.shape != t.shape or out.dtype != t.dtype:
        raise ValueError(
            f"reduce changed the tensor: {list(t.shape)}/{t.dtype} -> {list(out.shape)}/{out.dtype}"
        )
    return out.to(t.device)


def view_predictions(probs: Tensor) -> Tensor:
    """Per-view argmax with ties to the smallest label index.

    ``probs`` ``[V, C]`` -> ``[V]`` long. Written out (first index attaining the maximum)
    instead of relying on ``torch.argmax``, whose tie behaviour is not a documented
    contract on every backend.
    """
    num_labels = probs.shape[-1]
    best = probs.max(dim=-1, keepdim=True).values  # [V, 1]
    label_ids = torch.arange(num_labels, device=probs.device).expand_as(probs)  # [V, C]
    candidates = torch.where(probs == best, label_ids, num_labels)  # [V, C]
    return candidates.min(dim=-1).values


def vote_counts(
    predictions: Tensor, example_idx: Tensor, num_examples: int, num_labels: int
) -> Tensor:
    """Local vote histogram: ``counts[i, c]`` = number of held views of example i predicting c.

    ``predictions`` ``[V]``, ``example_idx`` ``[V]`` -> ``[N, C]`` int64. Integer counts add up
    exactly under an all-reduce, so every rank sees the same votes.
    """
    flat = example_idx.long() * num_labels + predictions.long()  # [V]
    counts = torch.zeros(num_examples * num_labels, dtype=torch.int64, device=predictions.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts.view(num_examples, num_labels)


def majority_vote(counts: Tensor) -> Tensor:
    """Pseudo-labels from (global) vote counts, ties to the smallest label index.

    ``counts`` ``[N, C]`` int64 -> ``[N]`` long. The key ``counts * C + (C - 1 - c)`` is unique
    per label and ranks first by count, then by smaller index; exact integer arithmetic.
    Raises ValueError naming the first example that received no vote at all.
    """
    num_labels = counts.shape[1]
    totals = counts.sum(dim=1)  # [N]
    empty = (totals == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"example {int(empty[0])} received no votes ({empty.numel()} examples without votes)"
        )
    tiebreak = num_labels - 1 - torch.arange(num_labels, device=counts.device)  # [C]
    key = counts.long() * num_labels + tiebreak  # [N, C]
    return key.argmax(dim=1)


def confidence_stats(
    probs: Tensor,
    predictions: Tensor,
    example_idx: Tensor,
    lang_idx: Tensor,
    pseudo_labels: Tensor,
    num_languages: int,
) -> Tensor:
    """Per-language local sums for the confidence and agreement statistics.

    ``probs`` ``[V, C]``, ``predictions``/``example_idx``/``lang_idx`` ``[V]``,
    ``pseudo_labels`` ``[N]`` -> ``[3, T]`` float64 with rows
    (sum of P(pseudo-label | view), number of views agreeing with the pseudo-label,
    number of views). One tensor so the distributed form needs one all-reduce; counts are
    exact in float64 up to 2**53.
    """
    labels = pseudo_labels[example_idx.long()]  # [V]
    p_label = probs.double().gather(1, labels.unsqueeze(1)).squeeze(1)  # [V]
    agree = (predictions == labels).double()  # [V]
    columns = torch.stack([p_label, agree, torch.ones_like(p_label)], dim=1)  # [V, 3]
    return per_language_sum(columns, lang_idx, num_languages).T.contiguous()  # [3, T]


def confidence_from_stats(stats: Tensor, languages: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(s_t, agreement) ``[T]`` float64 each, from (global) ``[3, T]`` sums.

    Raises ValueError naming a language that has no view at all (its confidence is undefined).
    """
    sums, agree, count = stats[0], stats[1], stats[2]
    missing = [languages[t] for t in (count == 0).nonzero().flatten().tolist()]
    if missing:
        raise ValueError(f"no views for language(s) {missing}")
    return sums / count, agree / count


def normalized_scores(confidence: Tensor) -> Tensor:
    """shat = softmax(s) over languages, in float64. ``[T]`` -> ``[T]``."""
    return torch.softmax(confidence.double(), dim=0)


def split_teachers(
    scores: Tensor, languages: Sequence[str], threshold: float | None = None
) -> tuple[float, list[str], list[str]]:
    """Split languages at theta: (theta, teachers, students), both lists in input order.

    theta is ``mean(scores)`` (= 1/T for softmax scores) unless ``threshold`` is given.
    A language is a teacher iff ``shat >= theta * (1 - TEACHER_RTOL)``: the relative tolerance
    absorbs softmax rounding so that languages with equal confidence all count as teachers.
    """
    theta = _check_threshold(threshold)
    if theta is None:
        theta = float(scores.double().mean())
    cutoff = theta * (1.0 - TEACHER_RTOL) if theta > 0 else theta * (1.0 + TEACHER_RTOL)
    is_teacher = (scores.double() >= cutoff).tolist()
    teachers = [lang for lang, keep in zip(languages, is_teacher, strict=True) if keep]
    students = [lang for lang, keep in zip(languages, is_teacher, strict=True) if not keep]
    return theta, teachers, students


def select_from_views(
    probs: Tensor,
    example_idx: Tensor,
    lang_idx: Tensor,
    num_examples: int,
    languages: Sequence[str],
    threshold: float | None = None,
    reduce: Reduce | None = None,
) -> Selection:
    """Teacher selection from the views this process holds; ranks combine via ``reduce``.

    Args:
        probs: ``[V, C]`` label distributions of the V views held here (V may be 0).
        example_idx: ``[V]`` example index of each view, in ``[0, num_examples)``.
        lang_idx: ``[V]`` language index of each view, in ``[0, len(languages))``.
        num_examples: N, the same on every rank.
        languages: the T language codes, the same (and in the same order) on every rank.
        threshold: fixed theta, or None for ``mean(shat)`` (= 1/T).
        reduce: sums a tensor over processes (identity when None). Called exactly twice, in
            the same order on every rank, even when this rank holds no views.

    Tie rules: per-view argmax and the majority vote both go to the smallest label index;
    teachers are ``shat >= theta`` up to a relative tolerance of 1e-9 (see module docstring).
    Every view must be held by exactly one rank for the result to equal ``select_teachers``.
    """
    langs = check_languages(languages)
    _check_threshold(threshold)
    reduce = _identity if reduce is None else reduce
    if probs.dim() != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape [V, C] with C >= 1, got {list(probs.shape)}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    _check_probs(probs)
    num_views, num_labels = probs.shape
    _check_index("example_idx", example_idx, num_views, num_examples)
    _check_index("lang_idx", lang_idx, num_views, len(langs))

    probs64 = probs.double()  # [V, C]; the cast is exact and keeps argmax ties
    predictions = view_predictions(probs64)  # [V]
    local_votes = vote_counts(predictions, example_idx, num_examples, num_labels)  # [N, C]
    pseudo_labels = majority_vote(_reduced(reduce, local_votes))  # [N]
    local_stats = confidence_stats(
        probs64, predictions, example_idx, lang_idx, pseudo_labels, len(langs)
    )  # [3, T]
    confidence, agreement = confidence_from_stats(_reduced(reduce, local_stats), langs)
    scores = normalized_scores(confidence)  # [T]
    theta, teachers, students = split_teachers(scores, langs, threshold)
    return Selection(
        languages=langs,
        pseudo_labels=pseudo_labels,
        confidence=confidence,
        scores=scores,
        threshold=theta,
        teachers=teachers,
        students=students,
        agreement=agreement,
        num_examples=num_examples,
    )


def all_views(num_examples: int, num_languages: int) -> tuple[Tensor, Tensor]:
    """(example_idx, lang_idx) ``[N*T]`` each, in the row order of ``probs.reshape(-1, C)``."""
    example_idx = torch.arange(num_examples).repeat_interleave(num_languages)  # [N*T]
    lang_idx = torch.arange(num_languages).repeat(num_examples)  # [N*T]
    return example_idx, lang_idx


def select_teachers(
    probs: Tensor, languages: Sequence[str], threshold: float | None = None
) -> Selection:
    """Single-process selection: ``select_from_views`` on all N*T views.

    ``probs`` ``[N, T, C]``: probability rows for every example in every language, languages in
    the order of ``languages``. Same tie/threshold rules as ``select_from_views``.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape [N, T, C], got {list(probs.shape)}")
    num_examples, num_languages, num_labels = probs.shape
    if len(languages) != num_languages:
        raise ValueError(
            f"probs has {num_languages} languages but {len(languages)} language codes were given"
        )
    example_idx, lang_idx = all_views(num_examples, num_languages)
    return select_from_views(
        probs.reshape(num_examples * num_languages, num_labels),
        example_idx.to(probs.device),
        lang_idx.to(probs.device),
        num_examples,
        languages,
        threshold=threshold,
    )


def most_confident(probs: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Self-training's pseudo-labels (paper Table 4 baselines): the ``fraction`` of examples
    whose top probability is highest (at least one; ties keep the earlier example), returned
    in corpus order. probs ``[N, C]`` -> (indices ``[K]`` long, labels ``[K]`` long)."""
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be [N, C] with N > 0, got {list(probs.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    conf, label = probs.max(-1)
    k = max(1, int(probs.shape[0] * fraction))
    keep = conf.argsort(descending=True, stable=True)[:k].sort().values
    return keep, label[keep]
