"""Bootstrap intervals (alsace_ds.method.stats) against a plain-loop reference that draws the
same indices, hand-computed statistics, and the cases a conclusion rests on."""

from __future__ import annotations

import math

import pytest
import torch

from alsace_ds.method.stats import (
    avg_accuracy,
    avg_gap,
    paired_bootstrap,
    seed_bootstrap,
)


def _matrix(n: int, t: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, t, generator=g) < p  # [N, T] bool


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's / torch's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * frac


def _naive_avg_acc(rows: list[list[bool]], cols: list[int]) -> float:
    return sum(100.0 * sum(r[c] for r in rows) / len(rows) for c in cols) / len(cols)


def test_paired_bootstrap_equals_a_plain_loop_with_the_same_draws():
    a, b = _matrix(40, 3, 0.6, 1), _matrix(40, 3, 0.7, 2)
    cols, draws = [1, 2], 300
    got = paired_bootstrap(a, b, avg_accuracy(cols), draws=draws, level=0.9, seed=7)
    idx = torch.randint(0, 40, (draws, 40), generator=torch.Generator().manual_seed(7))
    A, B = a.tolist(), b.tolist()
    samples = []
    for r in idx.tolist():  # the SAME examples for both models: paired
        samples.append(
            _naive_avg_acc([B[i] for i in r], cols) - _naive_avg_acc([A[i] for i in r], cols)
        )
    assert got.delta == pytest.approx(_naive_avg_acc(B, cols) - _naive_avg_acc(A, cols), abs=1e-12)
    assert got.lo == pytest.approx(_percentile(samples, 0.05), abs=1e-9)
    assert got.hi == pytest.approx(_percentile(samples, 0.95), abs=1e-9)
    assert (got.draws, got.seeds, got.level) == (draws, 1, 0.9)


def test_seed_bootstrap_equals_a_plain_two_level_loop():
    pairs = [(_matrix(30, 2, 0.5, s), _matrix(30, 2, 0.6 + 0.1 * s, 10 + s)) for s in range(3)]
    pairs.append((_matrix(20, 2, 0.5, 9), _matrix(20, 2, 0.5, 19)))  # a smaller test set
    draws = 200
    got = seed_bootstrap(pairs, avg_accuracy([0, 1]), draws=draws, seed=3)
    gen = torch.Generator().manual_seed(3)
    picks = torch.randint(0, 4, (draws, 4), generator=gen)
    samples = []
    for r in picks.tolist():
        total = 0.0
        for s in r:  # each drawn seed: its own examples, drawn again
            a, b = pairs[s]
            n = a.shape[0]
            rows = torch.randint(0, n, (1, n), generator=gen)[0].tolist()
            A, B = a.tolist(), b.tolist()
            total += _naive_avg_acc([B[i] for i in rows], [0, 1]) - _naive_avg_acc(
                [A[i] for i in rows], [0, 1]
            )
        samples.append(total / 4)
    observed = [
        _naive_avg_acc(b.tolist(), [0, 1]) - _naive_avg_acc(a.tolist(), [0, 1]) for a, b in pairs
    ]
    assert got.delta == pytest.approx(sum(observed) / 4, abs=1e-12)
    assert got.lo == pytest.approx(_percentile(samples, 0.025), abs=1e-9)
    assert got.hi == pytest.approx(_percentile(samples, 0.975), abs=1e-9)
    assert got.seeds == 4


def test_statistics_by_hand():
    # en (column 0) right on 3 of 4, fr on 1 of 4, de on 2 of 4
    c = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert float(avg_accuracy([0, 1, 2])(c[None])[0]) == pytest.approx(50.0)
    assert float(avg_accuracy([1])(c[None])[0]) == pytest.approx(25.0)
    # gap: (75 - 25) and (75 - 50) -> mean 37.5
    assert float(avg_gap(0, [1, 2])(c[None])[0]) == pytest.approx(37.5)


def test_identical_runs_give_zero_and_say_so():
    a = _matrix(50, 4, 0.7, 5)
    got = paired_bootstrap(a, a.clone(), avg_accuracy(range(4)), draws=100)
    assert (got.delta, got.lo, got.hi, got.covers_zero) == (0.0, 0.0, 0.0, True)
    assert "cannot be told from 0" in got.describe()


def test_a_real_gain_is_told_from_zero_but_not_across_contradicting_seeds():
    n = 400
    a = torch.zeros(n, 2, dtype=torch.bool)
    a[: n // 2] = True  # 50%
    up = a.clone()
    up[n // 2 : n // 2 + 40] = True  # +10 points on 40 examples
    down = a.clone()
    down[:40] = False  # -10 points
    one = paired_bootstrap(a, up, avg_accuracy([0, 1]), draws=500, seed=1)
    assert one.delta == pytest.approx(10.0) and one.lo > 0 and not one.covers_zero
    assert one.describe("pt").startswith("+10.00pt [")
    assert "95% bootstrap over test examples: differs from 0" in one.describe()
    seeds = seed_bootstrap([(a, up), (a, down), (a, up)], avg_accuracy([0, 1]), draws=500)
    # each run alone excludes 0, but the seeds disagree in sign: the interval must cover 0
    assert seeds.delta == pytest.approx(10.0 / 3) and seeds.covers_zero
    assert seeds.hi - seeds.lo > 2 * (one.hi - one.lo)
    assert "over 3 seeds x test examples" in seeds.describe()


def test_bad_inputs_are_named():
    with pytest.raises(
        ValueError, match=r"two \[N, T\] matrices of the same shape, got \[3, 2\] and \[4, 2\]"
    ):
        paired_bootstrap(_matrix(3, 2, 0.5, 0), _matrix(4, 2, 0.5, 0), avg_accuracy([0]))
    with pytest.raises(ValueError, match="no run pairs"):
        seed_bootstrap([], avg_accuracy([0]))
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.5"):
        paired_bootstrap(_matrix(3, 2, 0.5, 0), _matrix(3, 2, 0.5, 1), avg_accuracy([0]), level=1.5)
