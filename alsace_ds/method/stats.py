"""Confidence intervals for the difference between two runs' test accuracies.

Pure tensor code. Inputs are per-example correctness matrices ``correct`` ``[N, T]`` (bool:
example n answered right in language t) of two models on the SAME N test examples, so each
difference is paired: a bootstrap draws the same examples for both models.

- :func:`paired_bootstrap`: one run pair; resamples test examples.
- :func:`seed_bootstrap`: one run pair per seed; resamples seeds, then examples within each
  drawn seed, so the interval carries the spread from seed to seed as well as the finite
  test set (a single run's interval over examples can be much narrower than the spread).

Statistics (``statistic(correct) -> [B]`` for a batch ``[B, N, T]`` of resampled matrices):
:func:`avg_accuracy` (mean over the chosen languages of per-language accuracy, %) and
:func:`avg_gap` (mean over the chosen languages of acc(reference) - acc(t), in points).
Intervals are percentile intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Statistic = Callable[[Tensor], Tensor]  # [B, N, T] bool -> [B] float64


@dataclass(frozen=True)
class Interval:
    delta: float  # statistic(b) - statistic(a) on the data as observed
    lo: float
    hi: float
    level: float  # e.g. 0.95
    draws: int  # bootstrap replicates
    seeds: int  # run pairs the interval is over (1: examples only)

    @property
    def covers_zero(self) -> bool:
        """The difference cannot be told from 0 at this level."""
        return self.lo <= 0.0 <= self.hi

    def describe(self, unit: str = "") -> str:
        words = "cannot be told from 0" if self.covers_zero else "differs from 0"
        over = "test examples" if self.seeds == 1 else f"{self.seeds} seeds x test examples"
        return (
            f"{self.delta:+.2f}{unit} [{self.lo:+.2f}, {self.hi:+.2f}] "
            f"({100 * self.level:g}% bootstrap over {over}: {words})"
        )


def avg_accuracy(columns: Sequence[int]) -> Statistic:
    """Mean over ``columns`` (language indices) of per-language accuracy, in %."""
    cols = list(columns)

    def stat(correct: Tensor) -> Tensor:
        return 100.0 * correct[..., cols].double().mean(dim=(-2, -1))

    return stat


def avg_gap(reference: int, columns: Sequence[int]) -> Statistic:
    """Mean over ``columns`` of acc(reference) - acc(t), in points (the paper's gap)."""
    cols = list(columns)

    def stat(correct: Tensor) -> Tensor:
        acc = 100.0 * correct.double().mean(dim=-2)  # [B, T]
        return (acc[..., reference : reference + 1] - acc[..., cols]).mean(dim=-1)

    return stat


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"paired correctness must be two [N, T] matrices of the same shape, got "
            f"{list(a.shape)} and {list(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError("no test examples to resample")


def _interval(samples: Tensor, delta: float, level: float, seeds: int) -> Interval:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples, q).tolist()
    return Interval(delta, lo, hi, level, samples.numel(), seeds)


def example_draws(n: int, draws: int, generator: torch.Generator) -> Tensor:
    """``[draws, n]`` example indices drawn with replacement."""
    return torch.randint(0, n, (draws, n), generator=generator)


def paired_bootstrap(
    a: Tensor, b: Tensor, statistic: Statistic, draws: int = 2000, level: float = 0.95,
    seed: int = 0, chunk: int = 256,
) -> Interval:  # fmt: skip
    """Interval of ``statistic(b) - statistic(a)`` over test examples (paired draws)."""
    _check_pair(a, b)
    gen = torch.Generator().manual_seed(seed)
    idx = example_draws(a.shape[0], draws, gen)  # [draws, N]
    samples = torch.cat(
        [statistic(b[part]) - statistic(a[part]) for part in idx.split(chunk)]
    )  # fmt: skip  [draws]
    delta = float(statistic(b[None]) - statistic(a[None]))
    return _interval(samples, delta, level, 1)


def seed_bootstrap(
    pairs: Sequence[tuple[Tensor, Tensor]], statistic: Statistic, draws: int = 2000,
    level: float = 0.95, seed: int = 0, chunk: int = 256,
) -> Interval:  # fmt: skip
    """Interval of the mean over seeds of ``statistic(b_s) - statistic(a_s)``: each
    replicate draws ``S`` seeds with replacement and, for each drawn seed, its test examples
    with replacement (two-level bootstrap). The seeds' test sets may differ in size."""
    if not pairs:
        raise ValueError("no run pairs")
    for a, b in pairs:
        _check_pair(a, b)
    gen = torch.Generator().manual_seed(seed)
    S = len(pairs)
    picks = torch.randint(0, S, (draws, S), generator=gen)  # [draws, S]
    # Each pick's examples, drawn in pick order (one draw per pick, as a plain two-level
    # loop would), then each seed's statistics in batches rather than one call per pick.
    flat = picks.flatten().tolist()  # [draws * S]
    rows = [example_draws(pairs[s][0].shape[0], 1, gen)[0] for s in flat]
    owner = torch.arange(draws).repeat_interleave(S)  # [draws * S] the replicate of each pick
    samples = torch.zeros(draws, dtype=torch.float64)
    for s, (a, b) in enumerate(pairs):
        mine = [i for i, x in enumerate(flat) if x == s]
        for part in range(0, len(mine), chunk):
            sel = mine[part : part + chunk]
            idx = torch.stack([rows[i] for i in sel])  # [k, N_s]
            samples.index_add_(0, owner[sel], statistic(b[idx]) - statistic(a[idx]))
    samples /= S
    delta = sum(float(statistic(b[None]) - statistic(a[None])) for a, b in pairs) / S
    return _interval(samples, delta, level, S)
