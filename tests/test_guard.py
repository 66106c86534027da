"""The stage-2 collapse guard: its sums against a naive loop, its decisions, and a real run
whose distillation collapses (a learning rate far too high) being stopped and rolled back."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _launch import run_single
from alsace_ds.method.guard import Guard, collapse_warnings, monitor_metrics, monitor_sums
from alsace_ds.method.metrics import summarize

LANGS = ["en", "fr", "sw"]


def _random_views(seed=0, N=6, C=3):
    g = torch.Generator().manual_seed(seed)
    T = len(LANGS)
    probs = torch.softmax(torch.randn(N * T, C, generator=g), -1)
    perm = torch.randperm(N * T, generator=g)
    return probs[perm], perm // T, perm % T, torch.randint(0, C, (N,), generator=g)


def test_sums_split_across_ranks_equal_one_process_and_a_naive_loop():
    probs, ex, lang, labels = _random_views()
    N, T = 6, 3
    whole = monitor_sums(probs, ex, lang, N, T, labels)
    halves = [
        monitor_sums(probs[s], ex[s], lang[s], N, T, labels) for s in (slice(0, 7), slice(7, None))
    ]
    for k in whole:
        assert torch.allclose(whole[k], halves[0][k] + halves[1][k])
    metrics, pred = monitor_metrics(whole, LANGS, "en", None)
    for t, x in enumerate(LANGS):  # naive per-language loops
        rows = [i for i in range(len(probs)) if lang[i] == t]
        mean = sum(probs[i].double() for i in rows) / len(rows)
        mean = mean / mean.sum()  # float32 rows sum to 1 +- 1e-7: the entropy's distribution
        h = -sum(float(p) * math.log2(float(p)) for p in mean)
        assert metrics["mean_prediction_entropy_bits"][x] == pytest.approx(h, abs=1e-9)
        acc = 100 * sum(int(probs[i].argmax() == labels[ex[i]]) for i in rows) / len(rows)
        assert metrics["accuracy"][x] == pytest.approx(acc)
        for i in rows:
            assert pred[ex[i], t] == probs[i].argmax()
    cons = [100 * float((pred[:, t] == pred[:, 0]).double().mean()) for t in (1, 2)]
    assert metrics["consistency"] == pytest.approx(sum(cons) / 2)
    assert metrics["agreement_with_start"] == {x: 100.0 for x in LANGS}


def _m(en, ent, cons):
    return {"english_accuracy": en, "mean_prediction_entropy_bits": {"en": ent, "fr": ent},
            "agreement_with_start": {"en": 100.0, "fr": 100.0}, "consistency": cons}  # fmt: skip


def test_guard_decisions():
    g = Guard(max_en_drop=2.0, min_entropy_ratio=0.5, patience=2)
    assert g.check(_m(90, 1.5, 70), 0) == {
        "healthy": True,
        "improved": True,
        "stop": False,
        "problems": [],
    }
    assert g.check(_m(88.5, 1.2, 75), 2)["improved"]  # -1.5 points: still healthy
    v = g.check(_m(87.9, 1.2, 90), 4)  # -2.1 points: unhealthy, not kept
    assert not v["healthy"] and not v["improved"] and not v["stop"]
    assert "English dev accuracy 87.90 < start 90.00 - 2" in v["problems"][0]
    assert g.check(_m(89, 0.7, 95), 6)["problems"][0].startswith("en: mean-prediction entropy")
    assert g.check(_m(89, 0.7, 95), 6)["stop"] is True  # third unhealthy in a row (patience 2)
    # the kept check, the streak, and every check recorded with its verdict (what
    # distill_guard.json, report.json's guard table and a resume read)
    assert (g.best_step, g.bad_streak) == (2, 3)
    assert [(c["step"], c["healthy"], c["improved"], c["stop"]) for c in g.history] == [
        (0, True, True, False),
        (2, True, True, False),
        (4, False, False, False),
        (6, False, False, True),  # the second unhealthy in a row reaches patience 2
        (6, False, False, True),
    ]
    assert g.history[2]["english_accuracy"] == 87.9 and g.history[2]["problems"] == v["problems"]
    # the latest healthy check is kept even when its consistency is lower
    k = Guard()
    k.check(_m(90, 1.5, 80), 0)
    assert k.check(_m(90, 1.5, 79), 5)["improved"] and k.best_step == 5
    # drift: English and the entropies fine, but fr changed 20% of its predictions
    d = Guard(min_agreement=85.0)
    d.check(_m(90, 1.5, 80), 0)
    drift = _m(91, 1.5, 85)
    drift["agreement_with_start"] = {"en": 90.0, "fr": 80.0}
    v = d.check(drift, 5)
    assert not v["healthy"] and v["stop"] and d.best_step == 0
    assert v["problems"] == [
        "fr: agrees with its start predictions on 80.0% of dev examples < 85% (drifting)"
    ]
    off = Guard(min_agreement=0.0)
    off.check(_m(90, 1.5, 80), 0)
    assert off.check(drift, 5)["healthy"]
    # a guard restored from the saved state (a resume) decides as the original would
    h = Guard(max_en_drop=2.0, min_entropy_ratio=0.5, patience=2)
    h.load(json.loads(json.dumps(g.state())))
    assert (h.best_step, h.bad_streak, h.start) == (2, 3, g.start)
    assert h.history == g.history
    worse = _m(87.5, 1.2, 90)  # unhealthy against the RESTORED start (90 - 2), streak 3 -> 4
    want = {"healthy": False, "improved": False, "stop": True,
            "problems": ["English dev accuracy 87.50 < start 90.00 - 2"]}  # fmt: skip
    assert h.check(worse, 8) == g.check(worse, 8) == want
    fine = _m(89, 1.2, 90)
    assert h.check(fine, 10) == g.check(fine, 10) == {**want, "healthy": True, "improved": True,
                                                        "stop": False, "problems": []}  # fmt: skip
    assert (h.best_step, h.bad_streak) == (g.best_step, g.bad_streak) == (10, 0)


def test_guard_loads_the_state_of_older_checkpoints():
    """States saved before best_score was dropped still carry it: they load, and the key is
    not written again."""
    g = Guard()
    g.check(_m(90, 1.5, 80), 0)
    old = {**g.state(), "best_score": 80.0}
    h = Guard()
    h.load(json.loads(json.dumps(old)))
    assert (h.best_step, h.bad_streak, h.start, h.history) == (0, 0, g.start, g.history)
    assert "best_score" not in h.state()


def _bits(p: float) -> float:
    """Entropy (bits) of the two-label distribution [p, 1 - p]."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_report_warnings_apply_the_guard_rules():
    """collapse_warnings (test set, before -> after) and Guard.problems (dev checks) decide
    the English drop and the entropy collapse with the same rules and thresholds (cases on
    both sides of each threshold, and on it: a drop of exactly max_en_drop is allowed)."""
    langs, count = ["en", "fr"], torch.full((2,), 100.0, dtype=torch.float64)

    def summary(en: float, p: float) -> dict:  # both languages predict [p, 1 - p] on average
        sums = torch.tensor([[p, 1 - p]] * 2, dtype=torch.float64) * 100
        return summarize(langs, torch.tensor([en, 50.0]), count, "en", langs, [], None, sums)

    before = summary(90.0, 0.7)  # 0.88 bits
    seen = set()
    for drop, ratio in [(2.0, 0.5), (0.5, 0.9), (5.0, 0.2)]:
        for en, p in [(89.0, 0.75), (87.9, 0.7), (90.0, 0.8), (85.0, 0.97), (89.6, 0.72)]:
            after = summary(en, p)
            g = Guard(max_en_drop=drop, min_entropy_ratio=ratio)
            g.check(_m(90.0, before["mean_prediction_entropy_bits"]["en"], 0), 0)
            guard = g.check(_m(en, after["mean_prediction_entropy_bits"]["en"], 0), 1)["problems"]
            report = collapse_warnings(before, after, "en", drop, ratio)
            case = (drop, ratio, en, p)
            # the rules written out: English fell by MORE than max_en_drop; a language's mean
            # prediction entropy fell BELOW min_entropy_ratio of its start (both languages)
            en_fell = 90.0 - en > drop + 1e-9
            collapsing = 2 * (_bits(p) / _bits(0.7) < ratio)
            assert any(x.startswith("English dev") for x in guard) == en_fell, case
            assert any(x.startswith("en accuracy fell") for x in report) == en_fell, case
            assert sum("collapsing" in x for x in guard) == collapsing, case
            assert sum("collapsing" in x for x in report) == collapsing, case
            seen.add((en_fell, collapsing))
    assert seen == {(a, b) for a in (True, False) for b in (0, 2)}  # every outcome was met


@pytest.mark.launch
def test_collapse_is_stopped_and_rolled_back(tmp_path, cache, stage0_model):
    """lr 3e-3 collapses the tiny model within a few steps: the guard stops at the first check
    and the reported "after" model is the start (so after == before), with the curves logged."""
    out = tmp_path / "run"
    res = run_single(
        [f"run.output_dir={out}", "stage0.enabled=false", f"stage0.init_from={stage0_model}",
         "distill.max_steps=30", "distill.lr=3e-3", "distill.eval_every=3",
         "log.progress=false"],
        cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:]
    report = json.loads((out / "report.json").read_text())
    guard = report["guard"]
    assert guard["stopped_early"] is True and guard["best_step"] == 0
    steps = [c["step"] for c in guard["checks"]]
    assert steps == [0, 3]
    bad = guard["checks"][1]
    assert (
        not bad["healthy"] and bad["english_accuracy"] < guard["checks"][0]["english_accuracy"] - 2
    )
    assert guard["final_from"] == str(stage0_model)  # the start, rolled back to
    assert report["after"]["accuracy"] == report["before"]["accuracy"]
    assert "## Collapse guard" in (out / "report.md").read_text()
    ev = EventAccumulator(str(out / "tb")).Reload()
    tags = ev.Tags()["scalars"]
    assert "distill/guard/english_dev_accuracy" in tags and "distill/guard/consistency" in tags
    assert [e.step for e in ev.Scalars("distill/guard/english_dev_accuracy")] == [0, 3]
