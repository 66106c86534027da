"""Sharding arithmetic (equal work on every rank) and the evaluation math."""

from __future__ import annotations

import math

import pytest
import torch

from alsace_ds.data.batching import train_batches, view_batches
from alsace_ds.engine.schedules import lr_factor
from alsace_ds.engine.trainer import plan_steps
from alsace_ds.method.metrics import accuracy_counts, entropy_bits, markdown_table, summarize


@pytest.mark.parametrize("n,micro,world", [(10, 3, 2), (7, 4, 3), (1, 2, 2), (16, 4, 2)])
def test_train_batches_cover_everything_with_equal_steps(n, micro, world):
    per_rank = [train_batches(n, micro, r, world, seed=5) for r in range(world)]
    steps = {len(b) for b in per_rank}
    assert steps == {math.ceil(n / (micro * world))}
    assert all(len(batch) == micro for rank in per_rank for batch in rank)
    seen = sorted({i for rank in per_rank for batch in rank for i in batch})
    assert seen == list(range(n))
    # the same seed gives the same global order on every rank; another seed another order
    again = [train_batches(n, micro, r, world, seed=5) for r in range(world)]
    assert again == per_rank


def test_an_optimizer_step_trains_the_same_examples_however_it_is_split():
    """32 examples per step: 1 rank x 4 x 8 micro-steps, 2 x 4 x 4, 8 x 4 x 1, 16 x 2 x 1,
    32 x 1 x 1 give the same steps per epoch and the same examples in each step."""
    n, seed, batch = 500, 3, 32
    steps = None
    for world, micro in ((1, 4), (2, 4), (8, 4), (16, 2), (32, 1)):
        accum = batch // (micro * world)
        plan = plan_steps(n, micro, world, 100, accum, None)
        assert plan.total_optimizer_steps == 1600  # the presets' derivation: 100 x ceil(500/32)
        per_rank = [train_batches(n, micro, r, world, seed, accum) for r in range(world)]
        got = [
            sorted(
                i for r in range(world) for j in range(accum) for i in per_rank[r][s * accum + j]
            )
            for s in range(plan.micro_per_epoch // accum)
        ]
        assert len(got) == 16 and all(len(x) == batch for x in got)
        steps = steps or got
        assert got == steps, (world, micro)


@pytest.mark.parametrize("items,bs,world", [(10, 3, 3), (5, 2, 2), (1, 4, 3), (12, 4, 2)])
def test_view_batches_equal_forwards_and_exact_cover(items, bs, world):
    lengths = [(i * 7) % 5 for i in range(items)]
    out = [view_batches(items, bs, r, world, lengths) for r in range(world)]
    assert len({len(b) for b in out}) == 1  # same number of forwards on every rank
    valid = [i for rank in out for idx, ok in rank for i, v in zip(idx, ok, strict=True) if v]
    assert sorted(valid) == list(range(items))  # each view exactly once
    for rank in out:  # sorted longest first within a rank
        ls = [lengths[i] for idx, ok in rank for i, v in zip(idx, ok, strict=True) if v]
        assert ls == sorted(ls, reverse=True)


def test_accuracy_counts_against_loop():
    gen = torch.Generator().manual_seed(0)
    V, T, C = 200, 4, 3
    preds = torch.randint(0, C, (V,), generator=gen)
    labels = torch.randint(0, C, (V,), generator=gen)
    lang = torch.randint(0, T, (V,), generator=gen)
    out = accuracy_counts(preds, labels, lang, T, C)
    for t in range(T):
        sel = [i for i in range(V) if lang[i] == t]
        assert out["count"][t] == len(sel)
        assert out["correct"][t] == sum(int(preds[i] == labels[i]) for i in sel)
        for c in range(C):
            assert out["pred_hist"][t, c] == sum(int(preds[i] == c) for i in sel)


def test_summarize_gap_and_group_averages():
    langs = ["en", "a", "b", "c"]
    correct = torch.tensor([90.0, 80.0, 70.0, 50.0], dtype=torch.float64)
    count = torch.full((4,), 100.0, dtype=torch.float64)
    s = summarize(langs, correct, count, "en", ["en", "a"], ["b", "c"])
    assert s["accuracy"] == {"en": 90.0, "a": 80.0, "b": 70.0, "c": 50.0}
    assert s["gap"] == {"en": 0.0, "a": 10.0, "b": 20.0, "c": 40.0}
    assert s["averages"]["all"]["accuracy"] == pytest.approx(72.5)
    assert s["averages"]["all"]["gap"] == pytest.approx(70 / 3)  # non-English only
    assert s["averages"]["teachers"]["accuracy"] == pytest.approx(85.0)
    assert s["averages"]["teachers"]["gap"] == pytest.approx(10.0)
    assert s["averages"]["students"]["gap"] == pytest.approx(30.0)
    table = markdown_table(s, s, {"en": "teacher"})
    assert "| en | teacher | 90.00 | 90.00 | +0.00 | 0.00 | 0.00 |" in table
    assert "| **avg students** (2) | | 60.00 | 60.00 | +0.00 | 30.00 | 30.00 |" in table


def test_entropy_bits():
    assert entropy_bits([5, 5]) == pytest.approx(1.0)
    assert entropy_bits([10, 0, 0]) == 0.0
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)


def test_plan_and_schedule():
    plan = plan_steps(n=100, micro_batch=8, world=2, epochs=2, grad_accum=3, max_steps=None)
    # an epoch is whole optimizer steps: ceil(100 / 48) = 3 steps = 9 micro-steps
    assert plan.micro_per_epoch == 9 and plan.total_micro == 18 and plan.total_optimizer_steps == 6
    assert plan_steps(100, 8, 2, 2, 1, max_steps=4).total_micro == 4
    f = lr_factor("linear", total_steps=10, warmup_steps=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_health_warnings_flag_a_collapse_but_not_a_gain():
    from alsace_ds.reporting.report import health_warnings

    langs = ["en", "a"]
    count = torch.full((2,), 100.0, dtype=torch.float64)
    spread = torch.tensor([[40.0, 30.0, 30.0], [35.0, 35.0, 30.0]], dtype=torch.float64)
    before = summarize(langs, torch.tensor([90.0, 60.0]), count, "en", langs, [], spread)
    gain = summarize(langs, torch.tensor([90.0, 70.0]), count, "en", langs, [], spread)
    one_label = torch.tensor([[100.0, 0, 0], [100.0, 0, 0]], dtype=torch.float64)
    collapse = summarize(langs, torch.tensor([40.0, 40.0]), count, "en", langs, [], one_label)
    assert health_warnings(before, gain, "en") == []
    assert health_warnings(before, None, "en") == []
    w = health_warnings(before, collapse, "en")
    assert any("average accuracy fell from 75.00 to 40.00" in x for x in w)
    assert any("en accuracy fell by 50.00 points" in x for x in w)
    assert sum("collapsing toward one label" in x for x in w) == 2
