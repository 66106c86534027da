"""End to end: the real entry point under the real launcher (2 CPU ranks, gloo, ZeRO), on the
embedded task, and every output checked against an independent one-process recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
import yaml
from _golden import compare, record
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_ensemble import naive_predict

from _launch import (
    accuracy,
    check_report,
    check_selection,
    launch,
    recompute_for,
    run_single,
    stage0_used,
)
from alsace_ds.config import load_config
from alsace_ds.method.stats import avg_accuracy, paired_bootstrap
from alsace_ds.reporting.report import ENSEMBLE_NAMES

pytestmark = pytest.mark.launch


def test_run_directory_contents(xlmr_run):
    out, stdout = xlmr_run
    for rel in (
        "config.yaml",
        "selection.json",
        "report.json",
        "report.md",
        "stage0/model/config.json",
        "final/model/config.json",
        "checkpoints/stage0/latest",
        "checkpoints/distill/latest",
    ):
        assert (out / rel).is_file(), rel
    for stage in ("stage0", "distill"):
        tag = (out / "checkpoints" / stage / "latest").read_text().strip()
        assert (out / "checkpoints" / stage / tag).is_dir()
    # no temp files left behind by the atomic writers
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp-*"))
    # the console ends with the before/after table
    tail = stdout[stdout.rindex("# ALSACE report") :]
    assert "| **avg students**" in tail and "acc before" in tail
    # the resolved config is a valid config that names the real files
    cfg = load_config(out / "config.yaml")
    assert Path(cfg.task.unlabeled_file).is_file()
    assert (Path(cfg.model.name_or_path) / "config.json").is_file()  # the built model's folder
    # the figures: PNGs in plots/, linked from report.md, and TensorBoard images
    names = ["accuracy", "gap", "selection", "guard"]  # English, distill and its guard: all 4
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(f"{n}.png" for n in names)
    md = (out / "report.md").read_text()
    figures = md[md.index("## Figures") :]
    assert [f"![{n}](plots/{n}.png)" in figures for n in names] == [True] * 4
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"plots/{n}" for n in names)
    for n in names:
        (img,) = events.Images(f"plots/{n}")
        assert (img.height, img.width) == mpimg.imread(str(out / "plots" / f"{n}.png")).shape[:2]


def test_selection_equals_one_process_recomputation(xlmr_run):
    """2 ranks with views dealt across them == select_teachers on the full tensor of the
    model the run selected with: stage 0's best by English dev accuracy (stage0/best)."""
    out, stdout = xlmr_run
    start = stage0_used(out, stdout)
    assert start == out / "stage0" / "best"  # keep_best with dev checks (the default)
    sel = check_selection(out, start)
    cfg = load_config(out / "config.yaml")
    assert sel["num_examples"] == cfg.task.max_unlabeled == 500
    assert sel["threshold"] == pytest.approx(1 / len(cfg.task.languages))
    assert sum(r["shat_t"] for r in sel["languages"].values()) == pytest.approx(1.0)


def test_report_equals_one_process_evaluation(xlmr_run):
    out, stdout = xlmr_run
    report = check_report(out, stage0_used(out, stdout), out / "final" / "model")
    # stage 0 really learned English (3 labels: chance is 33%) and the disparity is there
    before = report["before"]["accuracy"]
    assert before["en"] > 80.0
    assert min(before.values()) < before["en"] - 10.0
    md = (out / "report.md").read_text()
    assert (
        f"| en | {'teacher' if 'en' in report['teachers'] else 'student'} | {before['en']:.2f} |"
        in md
    )


def test_tensorboard_has_the_curves(xlmr_run):
    out, _ = xlmr_run
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    langs = load_config(out / "config.yaml").task.languages
    expected = {"stage0/train/loss", "stage0/train/lr", "distill/train/loss", "distill/train/lr"}
    for lang in langs:
        expected |= {
            f"selection/s_t/{lang}",
            f"selection/shat_t/{lang}",
            f"eval/before/accuracy/{lang}",
            f"eval/after/accuracy/{lang}",
        }
        if lang != "en":
            expected |= {f"eval/before/gap/{lang}", f"eval/after/gap/{lang}"}
    assert expected <= tags, sorted(expected - tags)
    losses = [e.value for e in acc.Scalars("stage0/train/loss")]
    assert losses[-1] < losses[0]  # English fine-tuning reduced the loss
    report = json.loads((out / "report.json").read_text())
    tb_en = acc.Scalars("eval/before/accuracy/en")[0].value
    assert tb_en == pytest.approx(report["before"]["accuracy"]["en"], abs=1e-3)


def test_start_from_stage0_model_in_one_process_gives_the_same_selection(xlmr_run, cache, tmp_path):
    """Skipping stage 0 (init_from) on ONE process reproduces the 2-rank before-numbers."""
    out, stdout = xlmr_run
    res = run_single(
        [
            f"run.output_dir={tmp_path / 'again'}",
            "stage0.enabled=false",
            f"stage0.init_from={stage0_used(out, stdout)}",
            "distill.enabled=false",
            "log.progress=false",
        ],
        cache,
    )
    assert res.returncode == 0, res.stdout[-6000:]
    a = json.loads((out / "selection.json").read_text())
    b = json.loads((tmp_path / "again" / "selection.json").read_text())
    assert a["teachers"] == b["teachers"]
    for lang in a["languages"]:
        assert a["languages"][lang]["s_t"] == pytest.approx(b["languages"][lang]["s_t"], abs=1e-6)
    ra = json.loads((out / "report.json").read_text())["before"]["accuracy"]
    rb = json.loads((tmp_path / "again" / "report.json").read_text())["before"]["accuracy"]
    assert ra == pytest.approx(rb, abs=1e-9)
    cfg = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert cfg["stage0"]["enabled"] is False


def test_mt5_under_zero3_partitioned(tmp_path, cache):
    """mT5 label words + ZeRO-3 with every parameter partitioned, bf16 compute (mT5's default):
    the export gathers the fp32 shards, and the exported model reproduces the reported
    accuracy in one process computing in bf16."""
    out = tmp_path / "mt5"
    res = launch(
        [
            f"run.output_dir={out}",
            "model.family=mt5",
            "deepspeed.config=ds_configs/zero3.json",
            "deepspeed.param_persistence_threshold=0",
            "stage0.max_steps=6",
            "distill.max_steps=2",
            "eval.every_epoch=false",  # no dev checks (bf16 on a CPU is slow; not tested here)
            "log.progress=false",
        ],
        cache,
    )
    assert res.returncode == 0, res.stdout[-6000:]
    saved = json.loads((out / "final" / "model" / "config.json").read_text())
    assert saved["dtype"] == "float32"  # the fp32 master, gathered from ZeRO-3's partitions
    # bf16 rounding depends on the batch shapes (the run sorts views by length, the check
    # does not), so a near tie may flip: at most 5 of the 1000 test examples per language.
    start = stage0_used(out, res.stdout)
    check_report(out, start, out / "final" / "model", tol=0.5)
    # the vote of the model the run started from (bf16: at most 5 of 500 views flip)
    check_selection(out, start, tol=2e-3, agreement_tol=0.01)


def test_bf16_at_the_papers_lr_exports_and_evaluates_the_master_update(tmp_path, cache):
    """bf16 compute at lr 3e-8 under ZeRO-3 (every parameter partitioned): the start-up warning
    says the stage cannot change the model; the exported model is the fp32 master, moved by
    Adam's update (every weight by ~lr per step, none by more than the sum of the learning
    rates), not a bf16 copy (which kept 99.8% of the weights bit-identical and moved the rest
    by whole bf16 steps, ~1e-4); report.json's parameter change is that of the exported
    files; and the reported accuracy is that of the exported model."""
    from safetensors.torch import load_file

    from alsace_ds.method.movement import change_stats

    out = tmp_path / "bf16"
    res = launch(
        [
            f"run.output_dir={out}",
            "model.dtype=bf16",
            "deepspeed.config=ds_configs/zero3.json",
            "deepspeed.param_persistence_threshold=0",
            "stage0.max_steps=6",
            "distill.max_steps=4",
            "distill.lr=3e-8",
            "eval.every_epoch=false",  # no dev checks (bf16 on a CPU is slow; not tested here)
            "log.progress=false",
        ],
        cache,
    )
    assert res.returncode == 0, res.stdout[-6000:]
    warning = (
        "WARNING: distill (self-distillation) cannot change the model: it can move any weight "
    )
    assert res.stdout.count(warning) == 1, res.stdout[-4000:]
    assert "at most 7.50e-08 (the sum of its learning rates under Adam)" in res.stdout
    start_dir = Path(res.stdout.split("distill starts from ", 1)[1].split()[0])
    start = load_file(start_dir / "model.safetensors")
    final = load_file(out / "final" / "model" / "model.safetensors")
    assert {v.dtype for v in final.values()} == {torch.float32}
    bound = 3e-8 * (1 + 0.75 + 0.5 + 0.25)  # 4 steps, linear decay
    moved = {k: (final[k] - start[k]).abs() for k in start}
    largest = max(float(d.max()) for d in moved.values())
    assert bound * 0.9 < largest <= bound * 1.01, largest  # + fp32 rounding of w + delta
    n = sum(d.numel() for d in moved.values())
    assert sum(int((d > 0).sum()) for d in moved.values()) / n > 0.9  # Adam moved nearly all
    report = json.loads((out / "report.json").read_text())
    got = report["param_change"]["distill"]
    want = change_stats({f"hf_model.{k}": v for k, v in start.items()},
                        {f"hf_model.{k}": v for k, v in final.items()}, "bf16")  # fmt: skip
    for key in ("relative_change", "changed_share", "changed_share_compute", "max_abs_change"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["bound"]["bound"] == pytest.approx(bound) and got["bound"]["cannot_change"]
    assert "## How far training moved the weights" in (out / "report.md").read_text()
    check_report(out, start_dir, out / "final" / "model", tol=0.5)  # bf16 near-ties only


def test_saved_predictions_recompute_the_report_and_its_interval(xlmr_run):
    """predictions/test_{before,after}.safetensors reproduce report.json's accuracies without
    the model, and the report's after - before interval is the paired bootstrap of them; the
    test-time ensembles are recomputed from them, and the dev predictions are checked."""
    out, stdout = xlmr_run
    report = json.loads((out / "report.json").read_text())
    langs = report["languages"]
    correct = {}
    for name in ("before", "after"):
        saved = load_file(str(out / "predictions" / f"test_{name}.safetensors"))
        assert saved["probs"].shape == (report["num_test_examples"], len(langs), 3)
        correct[name] = saved["probs"].argmax(-1) == saved["labels"][:, None]  # [N, T]
        acc = {
            lang: 100.0 * float(correct[name][:, t].double().mean()) for t, lang in enumerate(langs)
        }
        assert acc == pytest.approx(report[name]["accuracy"], abs=1e-9)
    iv = report["intervals"]["avg_accuracy"]
    change = (
        report["after"]["averages"]["all"]["accuracy"]
        - report["before"]["averages"]["all"]["accuracy"]
    )
    assert iv["delta"] == pytest.approx(change, abs=1e-9)
    again = paired_bootstrap(correct["before"], correct["after"], avg_accuracy(range(len(langs))),
                             seed=load_config(out / "config.yaml").run.seed)  # fmt: skip
    assert (iv["lo"], iv["hi"], iv["covers_zero"]) == (again.lo, again.hi, again.covers_zero)
    assert iv["lo"] < iv["delta"] < iv["hi"] and iv["draws"] == 2000
    assert iv["text"] in (out / "report.md").read_text()
    check_ensembles(out, report)
    check_dev_predictions(out, stage0_used(out, stdout))


def check_ensembles(out: Path, report: dict) -> None:
    """report.json's test-time ensembles == a plain loop over the saved test predictions with
    the selection's shat_t as weights; report.md shows them."""
    sel = json.loads((out / "selection.json").read_text())
    langs = report["languages"]
    weights = [sel["languages"][x]["shat_t"] for x in langs]
    md = (out / "report.md").read_text()
    section = md[md.index("## Test-time ensembles (paper Figure 4)") :].split("\n## ", 1)[0]
    acc: dict[str, dict[str, float]] = {}
    for name in ("before", "after"):
        saved = load_file(str(out / "predictions" / f"test_{name}.safetensors"))
        labels = saved["labels"].tolist()
        for rule in ("language_weighted", "voted", "english"):
            pred = naive_predict(saved["probs"].tolist(), rule, weights, langs.index("en"))
            a = 100.0 * sum(p == y for p, y in zip(pred, labels, strict=True)) / len(labels)
            assert report["ensembles"][name][rule] == pytest.approx(a, abs=1e-9), (name, rule)
            acc.setdefault(rule, {})[name] = a
    for rule, a in acc.items():  # each rule's row of the section: before | after
        row = f"| {ENSEMBLE_NAMES[rule]} | {a['before']:.2f} | {a['after']:.2f} |"
        assert row in section.splitlines(), (row, section)


def check_dev_predictions(out: Path, start: Path) -> None:
    """predictions/dev_{before,after}.safetensors: every dev example in every language, the
    dev labels, and argmax accuracies equal to a one-process evaluation of the start and
    the final model on the dev file, and to the run's own all-reduced counts."""
    for name, model in (("before", start), ("after", out / "final" / "model")):
        saved = load_file(str(out / "predictions" / f"dev_{name}.safetensors"))
        cfg, probs, corpus = recompute_for(out, model, "dev_file")
        langs = cfg.task.languages
        assert saved["probs"].shape == (len(corpus), len(langs), 3) == probs.shape
        assert torch.equal(saved["labels"], corpus.labels())
        counts = json.loads((out / "results" / f"dev_{name}.json").read_text())
        correct = saved["probs"].argmax(-1) == saved["labels"][:, None]  # [N, T]
        assert correct.sum(0).tolist() == counts["correct"]
        acc = {x: 100.0 * float(correct[:, t].double().mean()) for t, x in enumerate(langs)}
        assert acc == pytest.approx(accuracy(probs, corpus, langs), abs=1e-9), name


def test_outputs_equal_those_before_the_views_were_tokenized_once(xlmr_run):
    """The same teachers, confidences, losses, accuracies, guard checks and test predictions
    as the code before the token cache and token-length batching (commit d6102ef, recorded
    by ``tests/_golden.py`` from this very fixture's command)."""
    out, _ = xlmr_run
    want = json.loads((Path(__file__).parent / "golden" / "xlmr-fast-d6102ef.json").read_text())
    assert compare(record(out), want) == []
    assert (out / "tokens" / "unlabeled.safetensors").is_file()  # cached beside the run
