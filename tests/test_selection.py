"""Teacher-language selection vs. an independent plain-Python reference."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from alsace_ds.method.selection import (
    Selection,
    confidence_from_stats,
    confidence_stats,
    majority_vote,
    normalized_scores,
    select_from_views,
    select_teachers,
    split_teachers,
    view_predictions,
    vote_counts,
)

# ---------------------------------------------------------------- naive reference (loops only)


def naive_select(probs: list, languages: list[str], threshold: float | None = None) -> dict:
    """METHOD.md stage 1 written with Python loops over nested lists [N][T][C]."""
    n_ex, n_lang, n_lab = len(probs), len(languages), len(probs[0][0])
    preds = []
    for i in range(n_ex):
        row = []
        for t in range(n_lang):
            best = 0
            for c in range(1, n_lab):
                if probs[i][t][c] > probs[i][t][best]:
                    best = c
            row.append(best)
        preds.append(row)
    labels = []
    for i in range(n_ex):
        counts = [0] * n_lab
        for t in range(n_lang):
            counts[preds[i][t]] += 1
        best = 0
        for c in range(1, n_lab):
            if counts[c] > counts[best]:
                best = c
        labels.append(best)
    conf, agree = [], []
    for t in range(n_lang):
        conf.append(math.fsum(probs[i][t][labels[i]] for i in range(n_ex)) / n_ex)
        agree.append(sum(1 for i in range(n_ex) if preds[i][t] == labels[i]) / n_ex)
    exps = [math.exp(s) for s in conf]
    scores = [e / math.fsum(exps) for e in exps]
    theta = math.fsum(scores) / n_lang if threshold is None else threshold
    teachers = [languages[t] for t in range(n_lang) if scores[t] >= theta - 1e-12]
    students = [languages[t] for t in range(n_lang) if scores[t] < theta - 1e-12]
    return dict(
        labels=labels,
        conf=conf,
        agree=agree,
        scores=scores,
        theta=theta,
        teachers=teachers,
        students=students,
    )


def assert_matches(sel: Selection, ref: dict, tol: float = 1e-12) -> None:
    assert sel.pseudo_labels.tolist() == ref["labels"]
    assert sel.confidence.dtype == torch.float64 and sel.scores.dtype == torch.float64
    assert sel.confidence.tolist() == pytest.approx(ref["conf"], abs=tol)
    assert sel.agreement.tolist() == pytest.approx(ref["agree"], abs=tol)
    assert sel.scores.tolist() == pytest.approx(ref["scores"], abs=tol)
    assert sel.threshold == pytest.approx(ref["theta"], abs=tol)
    assert sel.teachers == ref["teachers"]
    assert sel.students == ref["students"]


def random_probs(n: int, t: int, c: int, seed: int, quantize: int = 0) -> torch.Tensor:
    """[n, t, c] probability rows; ``quantize`` > 0 rounds logits to create many ties."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, c, generator=gen, dtype=torch.float64) * 2
    if quantize:
        logits = torch.randint(0, quantize, (n, t, c), generator=gen).double()
    return torch.softmax(logits, dim=-1)


LANGS = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur"]

# ---------------------------------------------------------------- end-to-end vs. reference


@pytest.mark.parametrize("num_labels", [2, 3])
@pytest.mark.parametrize("num_langs", [2, 5, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matches_reference(num_labels: int, num_langs: int, seed: int) -> None:
    probs = random_probs(40, num_langs, num_labels, seed)
    langs = LANGS[:num_langs]
    sel = select_teachers(probs, langs)
    ref = naive_select(probs.tolist(), langs)
    assert_matches(sel, ref)
    assert sel.num_examples == 40
    assert sel.languages == langs
    assert sel.teachers and sel.threshold == pytest.approx(1 / num_langs)


@pytest.mark.parametrize("num_labels", [2, 3])
@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_tie_heavy_random_matches_reference(num_labels: int, seed: int) -> None:
    # Integer logits in {0, 1}: per-view argmax ties and vote ties are everywhere.
    probs = random_probs(60, 4, num_labels, seed, quantize=2)
    langs = LANGS[:4]
    ref = naive_select(probs.tolist(), langs)
    assert_matches(select_teachers(probs, langs), ref)


def test_float32_and_bfloat16_inputs_are_computed_in_float64() -> None:
    probs = random_probs(30, 4, 3, seed=7).float()
    ref = naive_select(probs.double().tolist(), LANGS[:4])
    assert_matches(select_teachers(probs, LANGS[:4]), ref)
    bf = probs.bfloat16()
    ref_bf = naive_select(bf.double().tolist(), LANGS[:4])
    assert_matches(select_teachers(bf, LANGS[:4]), ref_bf)


# ---------------------------------------------------------------- crafted tie cases


def test_vote_tie_goes_to_smallest_label() -> None:
    # Per-view predictions (rows = examples): 2,1,2,1 -> tie 1/2 -> 1; 2,2,0,0 -> tie -> 0;
    # 1,2,1,2 -> tie -> 1; 2,0,1,2 -> 2 (plain majority).
    one_hot = torch.eye(3, dtype=torch.float64) * 0.8 + 0.2 / 3
    preds = [[2, 1, 2, 1], [2, 2, 0, 0], [1, 2, 1, 2], [2, 0, 1, 2]]
    probs = one_hot[torch.tensor(preds)]  # [4, 4, 3]
    sel = select_teachers(probs, ["a", "b", "c", "d"])
    assert sel.pseudo_labels.tolist() == [1, 0, 1, 2]


def test_argmax_tie_within_a_view_goes_to_smallest_label() -> None:
    probs = torch.tensor(
        [
            [0.4, 0.4, 0.2],
            [0.2, 0.4, 0.4],
            [1 / 3, 1 / 3, 1 / 3],
            [0.1, 0.2, 0.7],
        ],
        dtype=torch.float64,
    )
    assert view_predictions(probs).tolist() == [0, 1, 0, 2]
    # A single language: the pseudo-label is that view's prediction.
    sel = select_teachers(probs.unsqueeze(1), ["en"])
    assert sel.pseudo_labels.tolist() == [0, 1, 0, 2]
    assert sel.teachers == ["en"] and sel.students == []


def test_majority_vote_tie_rule_is_explicit() -> None:
    counts = torch.tensor([[1, 1, 0], [0, 2, 2], [3, 3, 3], [0, 0, 5], [2, 5, 5]])
    assert majority_vote(counts).tolist() == [0, 1, 0, 2, 1]


# ---------------------------------------------------------------- helpers, value by value


def test_vote_counts_scatter_add() -> None:
    predictions = torch.tensor([0, 2, 2, 1, 2])
    example_idx = torch.tensor([0, 0, 1, 1, 0])
    counts = vote_counts(predictions, example_idx, num_examples=3, num_labels=3)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[1, 0, 2], [0, 1, 1], [0, 0, 0]]


def test_confidence_stats_and_from_stats() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)
    example_idx = torch.tensor([0, 0, 1, 1])
    lang_idx = torch.tensor([0, 1, 0, 1])
    pseudo = torch.tensor([0, 1])
    preds = view_predictions(probs)
    stats = confidence_stats(probs, preds, example_idx, lang_idx, pseudo, num_languages=2)
    expected = [[0.9 + 0.4, 0.3 + 0.8], [1.0, 1.0], [2.0, 2.0]]
    assert stats.dtype == torch.float64
    assert torch.allclose(stats, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    conf, agree = confidence_from_stats(stats, ["en", "de"])
    assert conf.tolist() == pytest.approx([0.65, 0.55], abs=1e-15)
    assert agree.tolist() == [0.5, 0.5]


def test_normalized_scores_is_float64_softmax() -> None:
    s = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float32)
    shat = normalized_scores(s)
    exps = [math.exp(float(v)) for v in s.double()]
    assert shat.dtype == torch.float64
    assert shat.tolist() == pytest.approx([e / sum(exps) for e in exps], abs=1e-15)


def test_split_teachers_default_and_fixed_threshold() -> None:
    scores = torch.tensor([0.40, 0.25, 0.20, 0.15], dtype=torch.float64)
    theta, teachers, students = split_teachers(scores, ["a", "b", "c", "d"])
    assert theta == pytest.approx(0.25)
    assert teachers == ["a", "b"] and students == ["c", "d"]
    theta, teachers, students = split_teachers(scores, ["a", "b", "c", "d"], threshold=0.2)
    assert theta == 0.2 and teachers == ["a", "b", "c"] and students == ["d"]
    # Equal to theta up to one rounding step still counts as a teacher.
    below = torch.tensor([0.25 * (1 - 1e-15), 0.75], dtype=torch.float64)
    assert split_teachers(below, ["a", "b"], threshold=0.25)[1] == ["a", "b"]
    clearly_below = torch.tensor([0.25 * (1 - 1e-6), 0.75], dtype=torch.float64)
    assert split_teachers(clearly_below, ["a", "b"], threshold=0.25)[1] == ["b"]


# ---------------------------------------------------------------- threshold edge cases


@pytest.mark.parametrize("num_langs", [1, 2, 3, 7, 11, 15, 20])
@pytest.mark.parametrize("p", [0.5, 0.7, 0.913, 1.0])
def test_equal_confidences_make_every_language_a_teacher(num_langs: int, p: float) -> None:
    row = torch.tensor([p, 1 - p], dtype=torch.float64)
    probs = row.expand(10, num_langs, 2).clone()
    langs = [f"l{k}" for k in range(num_langs)]
    sel = select_teachers(probs, langs)
    assert sel.teachers == langs and sel.students == []
    assert sel.confidence.tolist() == pytest.approx([p] * num_langs, abs=1e-15)


def test_single_language_is_teacher() -> None:
    probs = random_probs(12, 1, 3, seed=11)
    sel = select_teachers(probs, ["en"])
    ref = naive_select(probs.tolist(), ["en"])
    assert_matches(sel, ref)
    assert sel.teachers == ["en"] and sel.scores.tolist() == [1.0] and sel.threshold == 1.0
    assert sel.agreement.tolist() == [1.0]


@pytest.mark.parametrize("threshold", [0.0, 0.06, 0.2, 0.3, 1.0])
def test_fixed_threshold_matches_reference(threshold: float) -> None:
    probs = random_probs(50, 5, 3, seed=21)
    langs = LANGS[:5]
    sel = select_teachers(probs, langs, threshold=threshold)
    ref = naive_select(probs.tolist(), langs, threshold=threshold)
    assert_matches(sel, ref)
    assert sel.threshold == threshold
    if threshold == 0.0:
        assert sel.teachers == langs
    if threshold == 1.0:
        assert sel.teachers == []


# ---------------------------------------------------------------- view-level form, one process


def test_select_from_views_any_view_order_matches_select_teachers() -> None:
    probs = random_probs(25, 6, 3, seed=31)
    langs = LANGS[:6]
    full = select_teachers(probs, langs)
    perm = torch.randperm(25 * 6, generator=torch.Generator().manual_seed(0))
    ex = torch.arange(25).repeat_interleave(6)[perm]
    lg = torch.arange(6).repeat(25)[perm]
    sel = select_from_views(probs[ex, lg], ex, lg, 25, langs)
    assert sel.pseudo_labels.tolist() == full.pseudo_labels.tolist()
    assert torch.allclose(sel.confidence, full.confidence, rtol=0, atol=1e-12)
    assert sel.teachers == full.teachers


class ThreadSumReducer:
    """In-process stand-in for all-reduce: ``world`` threads deposit, then all read the sum."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)
        self.calls = [0] * world

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return total

        return reduce


@pytest.mark.parametrize("world", [2, 3])
def test_select_from_views_split_over_threads_matches(world: int) -> None:
    n, t, c = 30, 5, 3
    probs = random_probs(n, t, c, seed=41, quantize=3)  # ties included
    langs = LANGS[:t]
    full = select_teachers(probs, langs)
    gen = torch.Generator().manual_seed(world)
    owner = torch.randint(0, world, (n * t,), generator=gen)
    owner[: n * t - 1][owner[: n * t - 1] == world - 1] = 0  # last rank holds a single view
    owner[-1] = world - 1
    ex_all = torch.arange(n).repeat_interleave(t)
    lg_all = torch.arange(t).repeat(n)
    red = ThreadSumReducer(world)
    results: list = [None] * world

    def run(rank: int) -> None:
        mask = owner == rank
        ex, lg = ex_all[mask], lg_all[mask]
        results[rank] = select_from_views(
            probs[ex, lg], ex, lg, n, langs, reduce=red.for_rank(rank)
        )

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert red.calls == [2] * world
    for sel in results:
        assert sel.pseudo_labels.tolist() == full.pseudo_labels.tolist()
        assert torch.allclose(sel.confidence, full.confidence, rtol=0, atol=1e-12)
        assert torch.allclose(sel.scores, full.scores, rtol=0, atol=1e-12)
        assert sel.teachers == full.teachers and sel.students == full.students


def test_rank_without_views_still_participates() -> None:
    probs = random_probs(8, 3, 2, seed=51)
    langs = LANGS[:3]
    full = select_teachers(probs, langs)
    red = ThreadSumReducer(2)
    results: list = [None, None]
    ex_all, lg_all = torch.arange(8).repeat_interleave(3), torch.arange(3).repeat(8)

    def run(rank: int) -> None:
        if rank == 0:
            args = (probs[ex_all, lg_all], ex_all, lg_all)
        else:
            empty = torch.zeros(0, dtype=torch.long)
            args = (torch.zeros(0, 2, dtype=torch.float64), empty, empty)
        results[rank] = select_from_views(*args, 8, langs, reduce=red.for_rank(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for sel in results:
        assert sel.pseudo_labels.tolist() == full.pseudo_labels.tolist()
        assert sel.teachers == full.teachers


# ---------------------------------------------------------------- to_dict


def test_to_dict_is_json_ready_and_consistent() -> None:
    probs = random_probs(20, 4, 3, seed=61)
    langs = LANGS[:4]
    sel = select_teachers(probs, langs)
    d = json.loads(json.dumps(sel.to_dict()))
    assert set(d) == {"threshold", "teachers", "students", "num_examples", "languages"}
    assert d["num_examples"] == 20 and d["teachers"] == sel.teachers
    assert d["threshold"] == pytest.approx(0.25)
    assert list(d["languages"]) == langs
    for t, lang in enumerate(langs):
        entry = d["languages"][lang]
        assert entry["s_t"] == float(sel.confidence[t])
        assert entry["shat_t"] == float(sel.scores[t])
        assert entry["agreement"] == float(sel.agreement[t])
        assert entry["role"] == ("teacher" if lang in sel.teachers else "student")


# ---------------------------------------------------------------- errors


def test_error_rank_and_language_count() -> None:
    with pytest.raises(ValueError, match=r"\[N, T, C\]"):
        select_teachers(torch.rand(4, 3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 languages but 2"):
        select_teachers(torch.rand(4, 3, 2), ["a", "b"])
    with pytest.raises(ValueError, match="duplicate languages"):
        select_teachers(torch.rand(4, 3, 2), ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"\[V, C\]"):
        select_from_views(torch.rand(4), torch.zeros(4, dtype=torch.long), torch.zeros(4), 1, ["a"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_error_bad_probabilities(bad: float) -> None:
    probs = random_probs(3, 2, 2, seed=0)
    probs[1, 1, 0] = bad
    match = "negative" if bad < 0 else "non-finite"
    with pytest.raises(ValueError, match=match):
        select_teachers(probs, ["a", "b"])


def test_error_language_without_views_is_named() -> None:
    probs = random_probs(4, 3, 2, seed=0)
    ex = torch.arange(4).repeat_interleave(2)
    lg = torch.tensor([0, 2]).repeat(4)  # language "b" (index 1) never appears
    with pytest.raises(ValueError, match=r"\['b'\]"):
        select_from_views(probs[ex, lg], ex, lg, 4, ["a", "b", "c"])


def test_error_example_without_votes_is_named() -> None:
    probs = random_probs(4, 2, 2, seed=0)
    keep = torch.tensor([0, 1, 3])  # example 2 has no view at all
    ex = keep.repeat_interleave(2)
    lg = torch.arange(2).repeat(3)
    with pytest.raises(ValueError, match="example 2"):
        select_from_views(probs[ex, lg], ex, lg, 4, ["a", "b"])


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf")])
def test_error_threshold_not_finite(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        select_teachers(random_probs(3, 2, 2, seed=0), ["a", "b"], threshold=threshold)


def test_error_index_out_of_range_and_bad_reduce() -> None:
    probs = random_probs(2, 2, 2, seed=0).reshape(4, 2)
    ex = torch.tensor([0, 0, 1, 2])
    lg = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="example_idx"):
        select_from_views(probs, ex, lg, 2, ["a", "b"])
    ex = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="lang_idx"):
        select_from_views(probs, ex, torch.tensor([0, 1, 0, 5]), 2, ["a", "b"])
    with pytest.raises(ValueError, match="reduce changed"):
        select_from_views(probs, ex, lg, 2, ["a", "b"], reduce=lambda t: t.double())
