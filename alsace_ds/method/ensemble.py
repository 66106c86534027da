"""Test-time ensembles over an example's language views (paper Figure 4).

Pure tensor code (no ``torch.distributed``). Input ``probs`` ``[N, T, C]``: the label
distribution of each of N parallel examples in each of T languages. Each language predicts
its argmax label (the first class on an exact tie, as ``torch.argmax`` and the evaluation
do), and one rule of :data:`ENSEMBLE_RULES` turns the T predictions into one per example:

- ``"language_weighted"``: each language's predicted label votes with weight ``weights[t]``
  (the selection's shat_t); the class with the largest summed weight wins;
- ``"voted"``: the same with equal weights (a majority vote);
- ``"english"``: English's own prediction (index ``english``), the paper's "best single
  language" reference.

Ties between classes with the same summed weight (compared exactly, in float64): the class
with the larger summed probability ``sum_t probs[n, t, c]`` among the tied classes wins, then
the lowest class index.
"""

from __future__ import annotations

import torch
from torch import Tensor

ENSEMBLE_RULES = ("language_weighted", "voted", "english")


def _check(probs: Tensor, rule: str, weights: Tensor | None, english: int | None) -> None:
    if probs.dim() != 3 or probs.shape[1] == 0 or probs.shape[2] == 0:
        raise ValueError(f"probs must have shape [N, T, C] with T, C > 0, got {list(probs.shape)}")
    T = probs.shape[1]
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"rule must be one of {list(ENSEMBLE_RULES)}, got {rule!r}")
    if rule == "language_weighted":
        if weights is None or weights.shape != (T,):
            shape = None if weights is None else list(weights.shape)
            raise ValueError(f"language_weighted needs weights of shape [{T}], got {shape}")
        if bool((weights < 0).any()):
            raise ValueError("language_weighted needs non-negative weights")
    if rule == "english" and (english is None or not 0 <= english < T):
        raise ValueError(f"the english rule needs an English index in [0, {T}), got {english}")


def weighted_vote(probs: Tensor, weights: Tensor) -> Tensor:
    """Each language's argmax votes with ``weights[t]``: ``[N, T, C]``, ``[T]`` -> ``[N]`` long.
    Ties: the larger summed probability among the tied classes, then the lowest index."""
    p = probs.double()
    votes = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double()  # [N, T, C]
    score = (votes * weights.double().to(p.device)[None, :, None]).sum(1)  # [N, C]
    tied = score == score.max(-1, keepdim=True).values  # [N, C]
    mass = torch.where(tied, p.sum(1), torch.full_like(score, -torch.inf))  # [N, C]
    return mass.argmax(-1)  # the first of equal maxima: the lowest index


def ensemble_predict(
    probs: Tensor, rule: str, *, weights: Tensor | None = None, english: int | None = None
) -> Tensor:
    """One prediction per example under ``rule`` (see the module docstring):
    ``probs`` ``[N, T, C]`` -> ``[N]`` long. ``weights`` ``[T]`` (non-negative) is needed by
    ``"language_weighted"``, ``english`` (a language index) by ``"english"``."""
    _check(probs, rule, weights, english)
    if rule == "english":
        return probs[:, english].argmax(-1)
    if rule == "voted":
        weights = torch.ones(probs.shape[1], dtype=torch.float64)
    return weighted_vote(probs, weights)


def ensemble_accuracies(
    probs: Tensor, labels: Tensor, weights: Tensor, english: int | None
) -> dict[str, float]:
    """Accuracy in % over the N examples (one prediction each) of every rule that applies
    (``"english"`` only with an English index): ``[N, T, C]``, ``[N]``, ``[T]`` -> {rule: acc}."""
    out = {}
    for rule in ENSEMBLE_RULES:
        if rule == "english" and english is None:
            continue
        pred = ensemble_predict(probs, rule, weights=weights, english=english)  # [N]
        out[rule] = 100.0 * float((pred == labels.to(pred.device)).double().mean())
    return out
