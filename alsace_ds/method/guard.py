"""The collapse guard of stage 2, without multilingual labels.

A pure consistency loss can reach a small gap by collapsing every language toward one
prediction for every input (accuracy falls, the gap "shrinks"). On a held-out parallel dev
slice, after every check the guard looks at:

- English dev accuracy (English labels are allowed: they are the task's training labels);
- the entropy of the MEAN prediction of each language (a collapse drives it to 0 bits);
- agreement of each language's predictions with its own pre-distillation predictions;
- cross-lingual consistency: how often a language predicts what English predicts on the same
  example (logged; not a selection criterion: on a real model it moved by less than its noise
  while accuracy rose, so picking by it rolled back useful training).

A check is *healthy* when English dev accuracy is at most ``max_en_drop`` points below its
pre-distillation value, every language's mean-prediction entropy is at least
``min_entropy_ratio`` times its pre-distillation value, and every language still agrees with
its own pre-distillation predictions on at least ``min_agreement`` percent of the dev
examples. The last rule catches DRIFT, which the first two cannot see: on a real model
(e5-small, MultiEmo) lr 1e-5 kept English dev accuracy up and the entropy flat while every
other language lost 2-7 points of accuracy in 19 steps; its agreement had fallen to 73-80%
(at lr 1e-6 it stayed at or above 93% in three seeds). The kept checkpoint is the LATEST
healthy check (the start counts as one): the guard protects from a collapse, it does not
second-guess healthy training; ``patience`` unhealthy checks in a row stop the stage early.

Pure tensor code: :func:`monitor_sums` returns sums and counts that the caller all-reduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def monitor_sums(
    probs: Tensor,
    example_idx: Tensor,
    lang_idx: Tensor,
    num_examples: int,
    num_languages: int,
    labels: Tensor | None,
) -> dict[str, Tensor]:
    """Per-rank sums over the local views.

    probs ``[V, C]``; example_idx, lang_idx ``[V]`` long; labels ``[N]`` or None. Returns
    float64 ``prob_sum`` ``[T, C]`` (for the mean prediction), ``count`` ``[T]``,
    ``pred`` ``[N * T]`` (argmax + 1 at each owned view, 0 elsewhere: an all-reduce sum gives
    every rank all predictions) and, with labels, ``correct`` ``[T]``.
    """
    T, C = num_languages, probs.shape[-1]
    prob_sum = torch.zeros(T, C, dtype=torch.float64)
    prob_sum.index_add_(0, lang_idx, probs.to(torch.float64))
    count = torch.zeros(T, dtype=torch.float64)
    count.index_add_(0, lang_idx, torch.ones_like(lang_idx, dtype=torch.float64))
    pred = torch.zeros(num_examples * T, dtype=torch.float64)
    argmax = probs.argmax(-1)
    pred[example_idx * T + lang_idx] = (argmax + 1).to(torch.float64)
    out = {"prob_sum": prob_sum, "count": count, "pred": pred}
    if labels is not None:
        correct = torch.zeros(T, dtype=torch.float64)
        correct.index_add_(0, lang_idx, (argmax == labels[example_idx]).to(torch.float64))
        out["correct"] = correct
    return out


def entropy_bits(p: Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def monitor_metrics(
    sums: dict[str, Tensor],
    languages: list[str],
    english: str | None,
    reference_pred: Tensor | None,
) -> dict:
    """Metrics from all-reduced sums. ``reference_pred`` ``[N, T]`` long (the start's
    predictions); None at the start itself (agreement 100%)."""
    T = len(languages)
    pred = (sums["pred"].long() - 1).view(-1, T)  # [N, T]
    mean = sums["prob_sum"] / sums["count"].clamp(min=1)[:, None]  # [T, C]
    entropy = {x: entropy_bits(mean[t]) for t, x in enumerate(languages)}
    ref = pred if reference_pred is None else reference_pred
    agree = {x: 100.0 * float((pred[:, t] == ref[:, t]).double().mean())
             for t, x in enumerate(languages)}  # fmt: skip
    # Consistency with English (or, without English, with the majority vote of the languages).
    if english is not None:
        anchor = pred[:, languages.index(english)]
    else:
        anchor = torch.mode(pred, dim=1).values
    others = [t for t, x in enumerate(languages) if x != english]
    consistency = 100.0 * float(
        torch.stack([(pred[:, t] == anchor).double().mean() for t in others]).mean()
    )
    out = {
        "mean_prediction_entropy_bits": entropy,
        "agreement_with_start": agree,
        "consistency": consistency,
    }
    if "correct" in sums:
        acc = 100.0 * sums["correct"] / sums["count"].clamp(min=1)
        out["accuracy"] = {x: float(acc[t]) for t, x in enumerate(languages)}
        if english is not None:
            out["english_accuracy"] = out["accuracy"][english]
    return out, pred


@dataclass
class Guard:
    """Decisions over the sequence of checks (same inputs on every rank -> same decisions)."""

    max_en_drop: float = 2.0
    min_entropy_ratio: float = 0.5
    patience: int = 1
    min_agreement: float = 0.0  # percent; 0 = off
    start: dict | None = None
    best_score: float = -math.inf
    best_step: int | None = None
    bad_streak: int = 0
    history: list[dict] = field(default_factory=list)

    def problems(self, m: dict) -> list[str]:
        """Why a check is unhealthy (empty list = healthy)."""
        if self.start is None:
            return []
        out = []
        en0, en = self.start.get("english_accuracy"), m.get("english_accuracy")
        if en0 is not None and en is not None and en < en0 - self.max_en_drop:
            out.append(f"English dev accuracy {en:.2f} < start {en0:.2f} - {self.max_en_drop:g}")
        for lang, h0 in self.start["mean_prediction_entropy_bits"].items():
            h = m["mean_prediction_entropy_bits"][lang]
            if h < self.min_entropy_ratio * h0:
                out.append(
                    f"{lang}: mean-prediction entropy {h:.3f} bits < "
                    f"{self.min_entropy_ratio:g} x start {h0:.3f} (collapsing toward one label)"
                )
        for lang, a in m["agreement_with_start"].items():
            if a < self.min_agreement:
                out.append(
                    f"{lang}: agrees with its start predictions on {a:.1f}% of dev examples < "
                    f"{self.min_agreement:g}% (drifting)"
                )
        return out

    def check(self, m: dict, step: int) -> dict:
        """Record a check; returns {healthy, improved, stop, problems}."""
        if self.start is None:
            self.start = m
        problems = self.problems(m)
        healthy = not problems
        improved = healthy  # the latest healthy check is the one kept
        if improved:
            self.best_score, self.best_step = m["consistency"], step
        self.bad_streak = 0 if healthy else self.bad_streak + 1
        stop = self.bad_streak >= self.patience
        verdict = {"healthy": healthy, "improved": improved, "stop": stop, "problems": problems}
        self.history.append({"step": step, **m, **verdict})
        return verdict

    def state(self) -> dict:
        return {
            "start": self.start,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "bad_streak": self.bad_streak,
            "history": self.history,
        }

    def load(self, state: dict) -> None:
        self.start, self.best_step = state["start"], state["best_step"]
        self.best_score, self.bad_streak = state["best_score"], state["bad_streak"]
        self.history = list(state["history"])
