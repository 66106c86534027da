"""View parallelism: ranks sharing each example and splitting its 7 language views (4 + 3, one
padded slot) give the losses and parameter updates of one rank holding all views."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _launch import ROOT, launch
from alsace_ds.config import load_config
from alsace_ds.data.corpus import load_parallel_jsonl
from alsace_ds.data.embedded import EMBEDDED_LANGUAGES
from alsace_ds.data.tokens import encode_views
from alsace_ds.method.pairs import pair_kl_loss
from alsace_ds.models.scorers import load_scorer
from alsace_ds.parallel import ParallelContext
from alsace_ds.recipes.strategies import local_languages

SGD_TRAIN = ROOT / "tests" / "_sgd_train.py"


def test_local_language_slots_cover_each_language_once():
    langs = list(EMBEDDED_LANGUAGES)  # 7
    for size in (1, 2, 3, 4, 7, 8):
        slots = [
            local_languages(langs, ParallelContext(rank=r, world_size=size, view_size=size))
            for r in range(size)
        ]
        assert len({len(s) for s in slots}) == 1  # same forward count on every member
        flat = [x for s in slots for x in s]
        assert flat[: len(langs)] == langs  # member order = language order after the gather


SGD_LR = 0.1  # plain SGD at this lr: each weight moves by exactly -lr x its gradient
N = 8  # unlabeled examples = the global batch: every step trains on all of them


def _run(out, cache, extra, nproc: int):
    """A run whose distillation optimizer is plain SGD (tests/_sgd_train.py): under AdamW a
    gradient off by a constant factor gives the same updates, under SGD a different update.
    Every optimizer step takes all N examples (whatever the layout and the shuffle), no
    dropout, no clipping (it would rescale a wrong gradient)."""
    args = [
        f"run.output_dir={out}",
        "stage0.epochs=1",  # a start whose languages disagree (3 steps: all views alike, KL ~0)
        f"task.max_unlabeled={N}",
        "distill.max_steps=2",
        f"distill.lr={SGD_LR}",
        "distill.schedule=constant",
        f"distill.global_batch={N}",
        f"distill.micro_batch={N}",
        "distill.view_parallel_size=2",
        "deepspeed.gradient_clipping=0.0",
        "model.dropout=0.0",
        "run.log_every=1",
        "eval.every_epoch=false",
        "log.progress=false",
        *extra,
    ]
    env = {"ALSACE_TEST_SGD_LR": str(SGD_LR)}
    res = launch(args, cache, nproc=nproc, script=SGD_TRAIN, env=env)
    assert res.returncode == 0, res.stdout[-5000:]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("distill/train/loss")}, res.stdout


def _one_rank(run_dir, start_dir, teachers):
    """The two SGD steps on one process, without DeepSpeed: ONE forward over all N x T views,
    the pair-KL loss, backward, ``w -= lr * grad``. Returns the losses by step and the
    weights' update."""
    cfg = load_config(run_dir / "config.yaml")
    t = cfg.task
    corpus = load_parallel_jsonl(t.unlabeled_file, t.languages, t.labels, require_label=False,
                                 max_examples=N)  # fmt: skip
    views = [ex.views[lang] for ex in corpus.examples for lang in t.languages]
    scorer, tok, _ = load_scorer("xlmr", start_dir, len(t.labels), dropout=0.0)
    start = {k: v.clone() for k, v in scorer.hf_model.state_dict().items()}
    enc = encode_views(tok, views, cfg.model.max_length)
    losses = {}
    for step in (1, 2):
        logits = scorer(**enc).float()
        log_probs = torch.log_softmax(logits, -1).view(N, len(t.languages), -1)
        loss = pair_kl_loss(log_probs, t.languages, teachers)
        scorer.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in scorer.parameters():
                p -= SGD_LR * p.grad
        losses[step] = float(loss.detach())
    end = scorer.hf_model.state_dict()
    return losses, start, torch.cat([(end[k] - start[k]).flatten() for k in sorted(start)])


@pytest.mark.launch
def test_view_parallel_groups_equal_one_rank(tmp_path, cache):
    """1 view group of 2 ranks (G=1) and 2 view groups of 2 ranks (G=2: 4 ranks, 4 of the N
    examples per group) against one process holding all views: the same losses at step 1
    (identical weights: forward + gather) and step 2 (after one update), and the same weight
    update, which under SGD is -lr x the gradient, so a gradient off by a factor of 2 (a
    gather whose backward does not sum the members' copies, a wrong average over groups)
    makes the update off by 50-100%, and the step-2 loss too."""
    g1 = tmp_path / "G1"
    got1, stdout1 = _run(g1, cache, [], nproc=2)  # its own stage 0 (2 ranks, data parallel)
    start_dir = g1 / "stage0" / "model"
    g2 = tmp_path / "G2"
    got2, stdout2 = _run(g2, cache, ["stage0.enabled=false", f"stage0.init_from={start_dir}"],
                         nproc=4)  # fmt: skip
    sel = json.loads((g1 / "selection.json").read_text())
    assert sel["students"] and sel["num_examples"] == N, sel  # teacher-student pairs too
    want, w0, want_update = _one_rank(g1, start_dir, sel["teachers"])
    assert want[1] > 1e-3  # the languages disagree: a real distillation loss
    assert want[2] < 0.9 * want[1]  # one SGD step lowered it (by ~20%)
    norm0 = float(torch.cat([w.flatten() for w in w0.values()]).norm())
    assert float(want_update.norm()) > 1e-3 * norm0  # the steps really moved the weights
    for name, run_dir, got, stdout, groups in (("G1", g1, got1, stdout1, 1),
                                               ("G2", g2, got2, stdout2, 2)):  # fmt: skip
        layout = f"distill layout: {groups} data-parallel group(s) x 2 rank(s) sharing"
        assert layout in stdout, stdout[-3000:]
        assert load_config(run_dir / "config.yaml").distill.view_parallel_size == 2
        assert json.loads((run_dir / "selection.json").read_text())["teachers"] == sel["teachers"]
        assert got == pytest.approx(want, rel=1e-4), (name, got, want)
        end = load_file(run_dir / "final" / "model" / "model.safetensors")
        update = torch.cat([(end[k] - w0[k]).flatten() for k in sorted(w0)])
        rel = float((update - want_update).norm() / want_update.norm())
        assert rel < 1e-3, (name, rel, float(update.norm() / want_update.norm()))


def test_view_parallel_size_must_divide_world(tmp_path, capsys):
    """Checked against the world the launcher announces (WORLD_SIZE), before any process
    group exists: rank 0 of 2 refuses, with the sizes."""
    import os
    from unittest import mock

    from alsace_ds.train import main

    with mock.patch.dict(os.environ, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}):
        rc = main([f"run.output_dir={tmp_path / 'x'}", "distill.view_parallel_size=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("alsace_ds: error:") == 1, err
    assert "view_parallel_size: 3 does not divide the world size 2" in err
    assert not (tmp_path / "x").exists()
