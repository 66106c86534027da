"""The paper's baselines offered beside ALSACE: English self-training (Table 4) through the real
entry point and its pseudo-label choice against a naive reference (the experiment driver's
tables over seeds: tests/test_experiment.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _launch import check_report, recompute_for, run_single, stage0_used
from alsace_ds.method.selection import most_confident


def test_most_confident_half_against_naive_sort():
    probs = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5], [0.8, 0.2], [0.3, 0.7]])
    keep, labels = most_confident(probs, 0.5)
    # top probabilities 0.6 0.9 0.5 0.8 0.7 -> the best two are rows 1 and 3, in corpus order
    assert keep.tolist() == [1, 3] and labels.tolist() == [1, 0]
    tie = torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.7, 0.3]])
    assert most_confident(tie, 0.34)[0].tolist() == [0]  # ties keep the earlier example
    with pytest.raises(ValueError, match="fraction"):
        most_confident(probs, 0.0)


@pytest.mark.launch
def test_english_self_training_run(tmp_path, cache, stage0_model):
    """Table 4's English self-training through the real entry point, against one process: its
    first loss is the cross-entropy of the model it started from on the most confident half
    of that model's English pseudo-labels (a wrong label, language, half or start changes
    it), and the model it reports after training is the one it exported."""
    out = tmp_path / "st"
    res = run_single(
        [f"run.output_dir={out}", "stage0.enabled=false", f"stage0.init_from={stage0_model}",
         "distill.method=english_self_training",
         "distill.max_steps=4", "distill.lr=1e-4", "distill.micro_batch=250",
         "model.dropout=0.0", "run.log_every=1", "log.progress=false"],
        cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:]
    m = re.search(r"kept the (\d+) most confident of (\d+) English pseudo-labels", res.stdout)
    assert m and (int(m[1]), int(m[2])) == (250, 500)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "english_self_training"
    assert [c["step"] for c in report["guard"]["checks"]][0] == 0  # the guard watched it too
    assert report["guard"]["final_from"] == "last step"  # the trained model, not rolled back
    # The pseudo-labels, recomputed: the start model's English predictions on the unlabeled
    # corpus, the 250 most confident by a naive sort (ties: the earlier example).
    start = stage0_used(out, res.stdout)
    assert start == stage0_model
    cfg, probs, _ = recompute_for(out, start, "unlabeled_file")
    english = probs[:, cfg.task.languages.index(cfg.task.english)].double()  # [500, C]
    top, label = english.max(-1)
    kept = sorted(sorted(range(len(top)), key=lambda i: (-float(top[i]), i))[:250])
    # One micro-batch holds all 250 (in any order), so step 1 is their mean cross-entropy at
    # the start weights (no dropout).
    first = -float(torch.stack([english[i, label[i]].log() for i in kept]).mean())
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("distill/train/loss")}
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[1] == pytest.approx(first, rel=1e-4), (losses, first)
    assert losses[4] < losses[1]  # it trained on them
    report = check_report(out, start, out / "final" / "model")
    assert report["after"]["accuracy"] != report["before"]["accuracy"]
