"""View parallelism: 2 ranks sharing each example and splitting its 7 language views (4 + 3,
one padded slot) give the loss and parameter updates of one rank holding all views."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _launch import launch, run_single
from alsace_ds.config import load_config
from alsace_ds.data.embedded import EMBEDDED_LANGUAGES
from alsace_ds.parallel import ParallelContext
from alsace_ds.recipes.strategies import local_languages


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


def _run(out, cache, extra, single: bool):
    args = [
        f"run.output_dir={out}",
        "stage0.max_steps=3",  # a briefly trained start, built identically by both runs
        "distill.max_steps=3",
        "distill.lr=1e-6",  # Adam's first steps are ~lr*sign(g): keep the tolerance meaningful
        "distill.micro_batch=4",
        "model.dropout=0.0",
        "run.log_every=1",
        "eval.every_epoch=false",
        "log.progress=false",
        *extra,
    ]
    res = run_single(args, cache) if single else launch(args, cache)
    assert res.returncode == 0, res.stdout[-5000:]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("distill/train/loss")}


def test_two_ranks_view_parallel_equal_one_rank(tmp_path, cache):
    # Stage 0 on one rank, so both distillation runs start from the very same weights.
    base = tmp_path / "one"
    one = _run(base, cache, [], single=True)
    stage0 = base / "stage0" / "model"
    two = _run(
        tmp_path / "vp",
        cache,
        ["stage0.enabled=false", f"stage0.init_from={stage0}", "distill.view_parallel_size=2"],
        single=False,
    )
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert one == pytest.approx(two, abs=1e-5), (one, two)
    sel_a = json.loads((base / "selection.json").read_text())
    sel_b = json.loads((tmp_path / "vp" / "selection.json").read_text())
    assert sel_a["teachers"] == sel_b["teachers"]
    wa = load_file(base / "final" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "vp" / "final" / "model" / "model.safetensors")
    w0 = load_file(stage0 / "model.safetensors")
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa)
    assert moved > 1e-6  # the steps really changed the weights
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < 1e-5, diff
    cfg = load_config(tmp_path / "vp" / "config.yaml")
    assert cfg.distill.view_parallel_size == 2


def test_view_parallel_size_must_divide_world(tmp_path, cache):
    res = launch([f"run.output_dir={tmp_path / 'x'}", "distill.view_parallel_size=3"], cache)
    assert res.returncode == 2, res.stdout[-3000:]
    assert "view_parallel_size: 3 does not divide the world size 2" in res.stdout
