"""The experiment driver: its tables and intervals from saved predictions (pure, against
hand computations), and the real driver end to end on the embedded task (runs, skips,
refusals, and every table cell recomputed by the independent tests/recompute_tables.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _launch import ROOT, child_env, run_cmd
from alsace_ds.method.stats import avg_accuracy, avg_gap, paired_bootstrap
from alsace_ds.reporting import experiment as rep

LANGS = ["en", "aa", "bb", "cc"]


def _preds(correct: torch.Tensor, labels: torch.Tensor, classes: int = 3) -> rep.Predictions:
    """Predictions whose argmax is right exactly where ``correct`` [N, T] says."""
    N, T = correct.shape
    wrong = (labels + 1) % classes
    guess = torch.where(correct, labels[:, None], wrong[:, None])  # [N, T]
    probs = torch.full((N, T, classes), 0.1)
    probs.scatter_(2, guess[..., None], 0.8)
    return rep.Predictions(probs, labels, LANGS)


def _seed(seed: int, gen: torch.Generator, p_before, p_after: dict) -> rep.SeedRuns:
    N = 200
    labels = torch.randint(0, 3, (N,), generator=gen)
    draw = lambda p: torch.rand(N, len(LANGS), generator=gen) < torch.tensor(p)  # noqa: E731
    return rep.SeedRuns(
        seed, LANGS, "en", ["en", "aa"], ["bb", "cc"], [0.4, 0.3, 0.2, 0.1],
        _preds(draw(p_before), labels), {k: _preds(draw(p), labels) for k, p in p_after.items()},
    )  # fmt: skip


def test_group_row_against_hand_computation():
    correct = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool
    )
    row = rep.group_row(correct, LANGS, "en", ["en", "aa"], ["bb", "cc"])
    # acc: en 75, aa 75, bb 50, cc 0; gaps aa 0, bb 25, cc 75
    assert row == pytest.approx({"avg_S": 25.0, "avg_T": 75.0, "avg_A": 50.0, "gap_S": 50.0,
                                 "gap_T": 0.0, "gap_A": 100 / 3, "gap_A_15": 25.0})  # fmt: skip
    no_students = rep.group_row(correct, LANGS, "en", LANGS, [])
    assert no_students["avg_S"] is None and no_students["gap_S"] is None


def test_tables_are_means_over_seeds_and_deltas_are_paired():
    gen = torch.Generator().manual_seed(0)
    before, alsace, other = [0.8, 0.6, 0.5, 0.4], [0.8, 0.7, 0.7, 0.6], [0.8, 0.6, 0.5, 0.45]
    seeds = [_seed(s, gen, before, {"alsace": alsace, "other": other}) for s in (1, 2)]
    rows = rep.table(seeds, [(rep.STAGE0, "start"), ("alsace", "ALSACE")])
    groups = [rep.group_row(s.after["alsace"].correct, LANGS, "en", s.teachers, s.students)
              for s in seeds]  # fmt: skip
    assert rows[1]["avg_A"] == pytest.approx((groups[0]["avg_A"] + groups[1]["avg_A"]) / 2)
    sd = abs(groups[0]["gap_S"] - groups[1]["gap_S"]) / 2**0.5
    assert rows[1]["gap_S_sd"] == pytest.approx(sd)

    out = rep.deltas(seeds, ["alsace", "other"], rep.STAGE0, draws=500)
    s1 = seeds[0]
    direct = paired_bootstrap(s1.before.correct, s1.after["alsace"].correct,
                              avg_gap(0, [1, 2, 3]), draws=500, seed=1)  # fmt: skip
    assert out[0]["per_seed"]["1"]["avg_gap"]["lo"] == pytest.approx(direct.lo)
    acc = out[0]["avg_accuracy"]
    mean = (
        sum(
            float(avg_accuracy(range(4))(s.after["alsace"].correct[None]))
            - float(avg_accuracy(range(4))(s.before.correct[None]))
            for s in seeds
        )
        / 2
    )
    assert acc["delta"] == pytest.approx(mean) and acc["seeds"] == 2
    assert acc["lo"] > 0 and not acc["covers_zero"]  # +12 points over 200 x 2 examples
    vs = rep.deltas(seeds, ["alsace", "other"], "alsace", draws=500)
    assert [r["run"] for r in vs] == ["other"] and vs[0]["avg_accuracy"]["delta"] < 0


def test_verdicts_say_which_way_in_plain_words():
    iv = {"delta": -1.2, "lo": -2.0, "hi": -0.3, "covers_zero": False, "seeds": 2}
    assert rep.verdict("x", "ALSACE", "avg_accuracy", iv).endswith("WORSE")
    assert rep.verdict("x", "ALSACE", "avg_gap", iv).endswith("better")  # a smaller gap
    iv0 = {**iv, "hi": 0.4, "covers_zero": True}
    assert rep.verdict("x", "ALSACE", "avg_accuracy", iv0).endswith("cannot be told apart")


def test_ensembles_accuracy_of_one_prediction_per_example():
    labels = torch.tensor([0, 1, 2, 0])
    # en right on 0,1; aa right on 0,2,3; bb, cc always predict class 1
    guess = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 1], [0, 2, 1, 1], [1, 0, 1, 1]])
    probs = torch.full((4, 4, 3), 0.1).scatter_(2, guess[..., None], 0.8)
    p = rep.Predictions(probs, labels, LANGS)
    s = rep.SeedRuns(1, LANGS, "en", ["en", "aa"], ["bb", "cc"], [0.4, 0.3, 0.2, 0.1], p, {})
    ens = rep.ensembles([s], None)["before"]
    assert ens["english"] == pytest.approx(50.0)
    # weighted votes: ex0 class0 0.7 vs class1 0.3 -> right; ex1 class1 0.7 -> right;
    # ex2 class0 0.4, class2 0.3, class1 0.3 -> wrong; ex3 class0 0.3 vs class1 0.7 -> wrong
    assert ens["language_weighted"] == pytest.approx(50.0)
    # equal votes: ex0 2-2 tie, equal summed probability too -> the lower class 0, right;
    # ex1 class 1 (3 votes) right; ex2 and ex3 class 1 wrong
    assert ens["voted"] == pytest.approx(50.0)
    assert ens["best"] == pytest.approx(75.0) and ens["avg"] == pytest.approx(
        (50 + 75 + 25 + 25) / 4
    )


# ----------------------------------------------------------------------------- end to end

TINY = ["stage0.epochs=2", "distill.max_steps=4", "distill.eval_every=2", "run.log_every=2",
        "log.plots=false", "eval.dev_predictions=false"]  # fmt: skip


def _driver(out: Path, cache: Path, variants: list[str], extra: list[str] = ()):
    cmd = [sys.executable, "-m", "alsace_ds.experiment", "--config", "configs/default.yaml",
           "--seeds", "1", "--variants", *variants, "--out", str(out), "--nproc", "1",
           *TINY, *extra]  # fmt: skip
    return run_cmd(cmd, child_env(cache), timeout=900)


# random.Random(1).sample(embedded languages, k) in task order, for each count k the vote may
# pick: written out once and pinned (not drawn again with the code under test).
RANDOM_SEED1 = {
    1: ["qaa"],
    2: ["qaa", "qad"],
    3: ["en", "qaa", "qad"],
    4: ["en", "qaa", "qab", "qad"],
    5: ["en", "qaa", "qab", "qad", "qae"],
    6: ["en", "qaa", "qab", "qad", "qae", "qaf"],
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cache, shm_op):
    out = tmp_path_factory.mktemp("exp")
    res = _driver(out, cache, ["random_selection", "alsace"])
    assert res.returncode == 0, res.stdout[-6000:]
    return out, res.stdout


@pytest.mark.launch
def test_driver_runs_every_variant_from_one_stage0_model(experiment):
    out, stdout = experiment
    seed = out / "seed1"
    model = seed / "stage0" / "stage0"
    for name in ("random_selection", "alsace"):
        launched = json.loads((seed / f"{name}.launch.json").read_text())["overrides"]
        assert "stage0.enabled=false" in launched
        used = [o for o in launched if o.startswith("stage0.init_from=")][0]
        assert used.split("=", 1)[1].startswith(str(model))
        assert (seed / name / "report.json").is_file()
    assert not (seed / "random_selection" / "stage0").exists()  # no second stage 0
    # random selection: the seeded sample (run.seed = 1) of as many languages as the vote picks
    sel = json.loads((seed / "random_selection" / "selection.json").read_text())
    vote = json.loads((seed / "stage0" / "selection.json").read_text())
    langs = list(sel["languages"])
    drawn = RANDOM_SEED1[len(vote["teachers_used"])]
    assert (sel["rule"], sel["seed"]) == ("random", 1)
    assert sel["teachers_used"] == drawn
    assert sel["students_used"] == [x for x in langs if x not in drawn]
    report = json.loads((seed / "random_selection" / "report.json").read_text())
    assert (report["teachers"], report["students"]) == (sel["teachers_used"], sel["students_used"])
    result = json.loads((out / "experiment.json").read_text())
    assert list(result["tables"]) == ["table3", "table4"]
    assert [r["run"] for r in result["tables"]["table4"]] == ["stage0", "alsace"]
    _check_verdicts(stdout, result["deltas"])
    assert (out / "plots" / "deltas_avg_accuracy_vs_stage0.png").stat().st_size > 1000


VERDICT = re.compile(
    r"^- (\S+) vs (.+?): (average accuracy|average gap) ([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), "
    r"([+-]\d+\.\d\d)\] points, (\d+) seeds?: (cannot be told apart|better|WORSE)$",
    re.M,
)


def _check_verdicts(stdout: str, deltas: list[dict]) -> None:
    """The console's plain-words verdicts: one per delta of experiment.json, with its numbers,
    and the word its interval implies (an interval holding 0: cannot be told apart; else
    better when accuracy rose or the gap fell)."""
    said = VERDICT.findall(stdout)
    want = [(r["run"], k, r[k]) for r in deltas for k in ("avg_accuracy", "avg_gap") if r.get(k)]
    assert len(said) == len(want) > 0, (said, stdout[-3000:])
    for (run, _, what, delta, lo, hi, n, word), (name, key, iv) in zip(said, want, strict=True):
        assert (run, what) == (name, {"avg_accuracy": "average accuracy"}.get(key, "average gap"))
        assert (delta, lo, hi) == tuple(f"{iv[x]:+.2f}" for x in ("delta", "lo", "hi"))
        assert int(n) == iv["seeds"]
        if iv["lo"] <= 0 <= iv["hi"]:
            assert word == "cannot be told apart", (run, key, iv)
        else:
            assert word == ("better" if (iv["delta"] > 0) == (key == "avg_accuracy") else "WORSE")


@pytest.mark.launch
def test_tables_recomputed_by_an_independent_script(experiment):
    out, _ = experiment
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "recompute_tables.py"), str(out)],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "every table cell agrees" in res.stdout


@pytest.mark.launch
def test_finished_runs_are_skipped_and_other_overrides_refused(experiment, cache):
    out, _ = experiment
    res = _driver(out, cache, ["alsace"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "seed 1 stage0: done already" in res.stdout and "running" not in res.stdout
    res = _driver(out, cache, ["alsace"], ["distill.lr=1e-3"])
    assert res.returncode == 1  # the driver's refusal (SystemExit with its message)
    assert f"{out / 'seed1' / 'stage0'} was made with other overrides" in res.stdout
