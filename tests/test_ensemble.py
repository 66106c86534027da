"""Test-time ensembles (paper Figure 4) against a plain-Python loop, ties included."""

from __future__ import annotations

import pytest
import torch

from alsace_ds.method.ensemble import ENSEMBLE_RULES, ensemble_accuracies, ensemble_predict


def naive_predict(probs: list, rule: str, weights: list | None, english: int | None) -> list:
    """One label per example with plain loops: each language votes for its first top class
    with its weight; ties -> larger summed probability, then the lowest class."""
    out = []
    for rows in probs:  # rows: T lists of C probabilities
        C = len(rows[0])
        first_top = [max(range(C), key=lambda c, r=r: (r[c], -c)) for r in rows]
        if rule == "english":
            out.append(first_top[english])
            continue
        w = [1.0] * len(rows) if rule == "voted" else weights
        score = [0.0] * C
        for t, c in enumerate(first_top):
            score[c] += w[t]
        best = max(score)
        tied = [c for c in range(C) if score[c] == best]
        mass = {c: sum(r[c] for r in rows) for c in tied}
        out.append(min(tied, key=lambda c: (-mass[c], c)))
    return out


def _random(gen: torch.Generator, N: int, T: int, C: int) -> torch.Tensor:
    return torch.softmax(torch.randn(N, T, C, generator=gen, dtype=torch.float64) * 2, -1)


@pytest.mark.parametrize("rule", ENSEMBLE_RULES)
@pytest.mark.parametrize(("T", "C"), [(4, 3), (5, 2), (6, 3)])
def test_rules_match_a_plain_loop_on_random_inputs(rule: str, T: int, C: int) -> None:
    gen = torch.Generator().manual_seed(T * 10 + C)
    probs = _random(gen, 200, T, C)
    # equal weights in pairs force weighted ties; voted ties are frequent with even T
    weights = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.15, 0.05][:T], dtype=torch.float64)
    pred = ensemble_predict(probs, rule, weights=weights, english=1)
    ref = naive_predict(probs.tolist(), rule, weights.tolist(), 1)
    assert pred.dtype == torch.long and pred.shape == (200,)
    assert pred.tolist() == ref


def test_forced_ties() -> None:
    # 2 languages vote class 0, 2 vote class 1 (equal weights): probability mass decides.
    probs = torch.tensor(
        [
            [[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.1, 0.9, 0.0]],  # mass 1 > 0
            [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.4, 0.6, 0.0]],  # mass 0 > 1
            [[0.7, 0.3, 0.0], [0.3, 0.7, 0.0], [0.7, 0.3, 0.0], [0.3, 0.7, 0.0]],  # equal: 0
            [[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.8, 0.2, 0.0]],  # argmax tie
        ],
        dtype=torch.float64,
    )
    assert ensemble_predict(probs, "voted").tolist() == [1, 0, 0, 0]
    # weights: languages 0+1 against 2+3, equal sums 0.5 / 0.5 -> the same tie-breaks
    w = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    assert ensemble_predict(probs, "language_weighted", weights=w).tolist() == [1, 0, 0, 0]
    # unequal weights break the vote without the mass: language 2 alone outweighs
    w = torch.tensor([0.1, 0.1, 0.7, 0.1], dtype=torch.float64)
    assert ensemble_predict(probs, "language_weighted", weights=w).tolist() == [1, 1, 0, 0]
    assert ensemble_predict(probs, "english", english=3).tolist() == [1, 1, 1, 0]
    assert ensemble_predict(probs, "voted").tolist() == naive_predict(probs.tolist(), "voted",
                                                                      None, None)  # fmt: skip


def test_accuracies_and_the_missing_english() -> None:
    gen = torch.Generator().manual_seed(1)
    probs = _random(gen, 50, 3, 3)
    labels = torch.randint(0, 3, (50,), generator=gen)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    acc = ensemble_accuracies(probs, labels, w, english=0)
    for rule in ENSEMBLE_RULES:
        ref = naive_predict(probs.tolist(), rule, w.tolist(), 0)
        expect = 100.0 * sum(int(p == y) for p, y in zip(ref, labels.tolist(), strict=True)) / 50
        assert acc[rule] == pytest.approx(expect, abs=1e-12)
    assert list(ensemble_accuracies(probs, labels, w, english=None)) == [
        "language_weighted",
        "voted",
    ]


def test_bad_inputs() -> None:
    probs = torch.full((2, 3, 2), 0.5)
    with pytest.raises(ValueError, match="rule"):
        ensemble_predict(probs, "mean")
    with pytest.raises(ValueError, match=r"weights of shape \[3\]"):
        ensemble_predict(probs, "language_weighted", weights=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        ensemble_predict(probs, "language_weighted", weights=-torch.ones(3))
    with pytest.raises(ValueError, match="English index"):
        ensemble_predict(probs, "english")
    with pytest.raises(ValueError, match=r"\[N, T, C\]"):
        ensemble_predict(probs[0], "voted")
