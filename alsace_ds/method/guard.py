"""The collapse guard of stage 2, without multilingual labels, and the report's collapse rules.

A pure consistency loss can reach a small gap by collapsing every language toward one
prediction for every input (accuracy falls, the gap "shrinks"). On a held-out parallel dev
slice, after every check the guard looks at:

- English dev accuracy (English labels are allowed: they are the task's training labels);
- the entropy of the MEAN prediction of each language (a collapse drives it to 0 bits);
- agreement of each language's predictions with its own pre-distillation predictions;
- cross-lingual consistency: how often a language predicts what English predicts on the same
  example (logged only: it is too noisy to decide on).

A check is *healthy* when English dev accuracy is at most ``max_en_drop`` points below its
pre-distillation value, every language's mean-prediction entropy is at least
``min_entropy_ratio`` times its pre-distillation value, and every language still agrees with
its own pre-distillation predictions on at least ``min_agreement`` percent of the dev
examples. The last rule catches DRIFT, which the first two cannot see: English accuracy and
the entropies can stay put while the other languages change their predictions (and lose
accuracy). The kept checkpoint is the LATEST healthy check (the start counts as one): the
guard protects from a collapse, it does not second-guess healthy training; ``patience``
unhealthy checks in a row stop the stage early.

The first two rules (:func:`english_dropped`, :func:`collapsed_languages`) are also the
report's test-set warnings, :func:`collapse_warnings`, with the same thresholds.

Pure tensor code: :func:`monitor_sums` returns sums and counts that the caller all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alsace_ds.method.metrics import entropy_bits, per_language_sum


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
    argmax = probs.argmax(-1)  # [V]
    ones = torch.ones(len(argmax), 1, dtype=torch.float64, device=probs.device)  # [V, 1]
    columns = [probs.to(torch.float64), ones]
    if labels is not None:
        columns.append((argmax == labels[example_idx]).to(torch.float64)[:, None])
    sums = per_language_sum(torch.cat(columns, dim=1), lang_idx, T)  # [T, C + 1 (+ 1)]
    pred = torch.zeros(num_examples * T, dtype=torch.float64)
    pred[example_idx * T + lang_idx] = (argmax + 1).to(torch.float64)
    out = {"prob_sum": sums[:, :C].contiguous(), "count": sums[:, C].contiguous(), "pred": pred}
    if labels is not None:
        out["correct"] = sums[:, C + 1].contiguous()
    return out


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


# ----------------------------------------------------------------------------- the rules


def english_dropped(before: float | None, after: float | None, max_drop: float) -> bool:
    """True when English accuracy (percent) fell by MORE than ``max_drop`` points; False when
    either value is unknown (no English)."""
    return before is not None and after is not None and after < before - max_drop


def collapsed_languages(
    before: dict[str, float], after: dict[str, float], min_ratio: float
) -> list[str]:
    """The languages (in ``before``'s order) whose mean-prediction entropy (bits) fell below
    ``min_ratio`` times its value in ``before``."""
    return [lang for lang, h0 in before.items() if after[lang] < min_ratio * h0]


def collapse_warnings(
    before: dict,
    after: dict | None,
    english: str | None,
    max_en_drop: float,
    min_entropy_ratio: float,
) -> list[str]:
    """Signs that distillation hurt, from two :func:`~alsace_ds.method.metrics.summarize`
    outputs of the labeled test set (empty list: none; ``after`` None: no distillation).

    The guard's rules with the guard's thresholds (``distill.guard_max_en_drop``,
    ``distill.guard_min_entropy_ratio``), plus one the test set's labels allow: the average
    accuracy fell (a smaller gap bought with lower accuracy is a failure). The entropy rule
    needs ``mean_prediction_entropy_bits`` (``summarize(..., prob_sum=...)``) in both.
    """
    if after is None:
        return []
    out = []
    b, a = before["averages"]["all"]["accuracy"], after["averages"]["all"]["accuracy"]
    if a < b:
        out.append(f"average accuracy fell from {b:.2f} to {a:.2f}: a smaller gap is no gain here")
    if english is not None:
        en0, en = before["accuracy"][english], after["accuracy"][english]
        if english_dropped(en0, en, max_en_drop):
            out.append(f"{english} accuracy fell by {en0 - en:.2f} points")
    h0, h = before.get("mean_prediction_entropy_bits"), after.get("mean_prediction_entropy_bits")
    if h0 is not None and h is not None:
        for lang in collapsed_languages(h0, h, min_entropy_ratio):
            out.append(
                f"{lang}: prediction entropy fell from {h0[lang]:.2f} to {h[lang]:.2f} bits "
                "(predictions collapsing toward one label)"
            )
    return out


@dataclass
class Guard:
    """Decisions over the sequence of checks (same inputs on every rank -> same decisions)."""

    max_en_drop: float = 2.0
    min_entropy_ratio: float = 0.5
    patience: int = 1
    min_agreement: float = 0.0  # percent; 0 = off
    start: dict | None = None
    best_step: int | None = None
    bad_streak: int = 0
    history: list[dict] = field(default_factory=list)

    def problems(self, m: dict) -> list[str]:
        """Why a check is unhealthy (empty list = healthy)."""
        if self.start is None:
            return []
        out = []
        en0, en = self.start.get("english_accuracy"), m.get("english_accuracy")
        if english_dropped(en0, en, self.max_en_drop):
            out.append(f"English dev accuracy {en:.2f} < start {en0:.2f} - {self.max_en_drop:g}")
        h0, h = self.start["mean_prediction_entropy_bits"], m["mean_prediction_entropy_bits"]
        for lang in collapsed_languages(h0, h, self.min_entropy_ratio):
            out.append(
                f"{lang}: mean-prediction entropy {h[lang]:.3f} bits < "
                f"{self.min_entropy_ratio:g} x start {h0[lang]:.3f} (collapsing toward one label)"
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
            self.best_step = step
        self.bad_streak = 0 if healthy else self.bad_streak + 1
        stop = self.bad_streak >= self.patience
        verdict = {"healthy": healthy, "improved": improved, "stop": stop, "problems": problems}
        self.history.append({"step": step, **m, **verdict})
        return verdict

    def state(self) -> dict:
        return {
            "start": self.start,
            "best_step": self.best_step,
            "bad_streak": self.bad_streak,
            "history": self.history,
        }

    def load(self, state: dict) -> None:
        """Restore :meth:`state`; older states also carry ``best_score`` (ignored)."""
        self.start, self.best_step = state["start"], state["best_step"]
        self.bad_streak = state["bad_streak"]
        self.history = list(state["history"])
