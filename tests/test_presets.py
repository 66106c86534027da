"""Every preset in configs/presets loads, resolves its batch sizes on 1-8 ranks, and prepares
its task end to end with the Hub names swapped for local copies of the same schema (datasets
and tiny models): splits disjoint, templates rendered, verbalizers known, the scorer built."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch

from _hub_fixtures import LANGUAGES, make_copa_repo, make_hub_repo, vocabulary
from alsace_ds.config import ConfigError, config_path, load_config, preset_names, with_world
from alsace_ds.data.tasks import prepare_task
from alsace_ds.data.tokens import encode_views
from alsace_ds.engine.ds_config import build_ds_config
from alsace_ds.models.scorers import load_scorer
from alsace_ds.models.tiny import build_tiny_model

N = 1000  # validation[:500] (unlabeled) and validation[-500:] (dev) are then disjoint
COLUMNS = {"xnli": ("premise", "hypothesis"), "pawsx": ("sentence1", "sentence2"),
           "xcopa": ("premise", "choice1", "choice2")}  # fmt: skip
LABELS = {"xnli": ["entailment", "neutral", "contradiction"],
          "pawsx": ["not_paraphrase", "paraphrase"], "xcopa": ["choice1", "choice2"]}  # fmt: skip


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Local copies of the task repos and a tiny model per (task, family)."""
    hf = str(tmp_path_factory.mktemp("hf"))
    root = tmp_path_factory.mktemp("presets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", hf)
        mp.setenv("HF_HUB_OFFLINE", "1")
        repos = {t: make_hub_repo(root / t, t, n=N if t != "xcopa" else 40) for t in COLUMNS}
        repos["copa"] = make_copa_repo(root / "copa", n=40)
        models = {}
        for task, cols in COLUMNS.items():
            words = vocabulary(task, cols, LANGUAGES[task], N if task != "xcopa" else 40)
            if task == "xcopa":
                words += vocabulary("copa", cols, ["en"], 40)
            for family in ("xlmr", "mt5"):
                words_t = words + (["1", "2"] if task == "xcopa" else [])
                models[task, family] = build_tiny_model(
                    root / f"{task}-{family}", family, words_t, LABELS[task]
                )
        yield repos, models


# (micro_batch, grad_accum) per rank for 32 examples per step on `world` ranks, by the preset's
# micro_batch cap: written out by hand, not recomputed with config.split_batch.
SPLITS = {
    4: {1: (4, 8), 2: (4, 4), 4: (4, 2), 8: (4, 1), 16: (2, 1), 32: (1, 1)},
    2: {1: (2, 16), 2: (2, 8), 4: (2, 4), 8: (2, 2), 16: (2, 1), 32: (1, 1)},
}


def check_world_sizes(cfg) -> None:
    """The presets' batch of 32 examples per optimizer step, exactly, on 1 to 32 ranks (the
    Slurm scripts' default is 2 nodes x 8 GPUs = 16); beyond what the batch can split, a
    clear refusal for stage 0 and view groups for stage 2."""
    batch0, batch2 = cfg.stage0.global_batch, cfg.distill.global_batch
    assert batch0 == batch2 == 32
    for world in (1, 2, 4, 8, 16, 32):
        w = with_world(cfg, world)
        assert w.distill.view_parallel_size == 1, world
        caps = (cfg.stage0.micro_batch, cfg.distill.micro_batch)
        for stage, cap in zip((w.stage0, w.distill), caps, strict=True):
            # each rank's 32 / world examples in micro-steps of the largest size <= the
            # preset's cap that divides them (cap 4: 4x8, 4x4, 4x2, 4x1, 2x1, 1x1)
            want = SPLITS[cap][world]
            assert (stage.micro_batch, stage.grad_accum) == want, (world, cap, stage)
            ds = build_ds_config(w, stage, world)
            got = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
            assert got == want and ds["train_batch_size"] == 32, (world, ds)
    # 3 nodes x 8 GPUs: stage 2 splits each example's views over groups of 3 ranks; 8 groups
    # of 4 examples (DeepSpeed counts every rank: 4 x 1 x 24 = 96 "samples" per step)
    w = with_world(
        dataclasses.replace(cfg, stage0=dataclasses.replace(cfg.stage0, enabled=False)), 24
    )
    assert w.distill.view_parallel_size == 3
    assert (w.distill.micro_batch, w.distill.grad_accum) == (4, 1)
    ds = build_ds_config(w, w.distill, 24)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (4, 96)
    # stage 0 has no view groups: refused, naming what works
    with pytest.raises(ConfigError) as err:
        with_world(cfg, 64)
    assert err.value.problems == [
        f"stage0.global_batch: {batch0} examples per step do not split evenly over 64 ranks; "
        "it runs on 1, 2, 4, 8, 16, 32 ranks (the divisors of 32). On 64 ranks set "
        "stage0.global_batch to a multiple of 64 (e.g. 64), or fine-tune elsewhere and pass "
        "stage0.enabled=false stage0.init_from=<model folder>"
    ]


@pytest.mark.parametrize("name", preset_names())
def test_preset(name, local, tmp_path):
    repos, models = local
    raw = load_config(config_path(name))
    task, family = raw.task.name, raw.model.family
    assert raw.model.name_or_path.startswith(("xlm-roberta", "google/mt5"))  # Hub names
    assert raw.model.dropout == 0.1  # paper appendix A.1 (the lr: tests/test_schedules.py)
    assert raw.task.max_unlabeled == 500
    swap = [
        f"model.name_or_path={models[task, family]}",
        f"task.source={repos[task]}",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    if task == "xcopa":
        swap.append(f"task.train_source={repos['copa']}")
    cfg = load_config(config_path(name), swap)
    check_world_sizes(cfg)
    if family == "mt5":  # bf16 compute through torch autocast; fp32 weights (never DS's bf16)
        assert cfg.model.resolved_dtype == "bf16"
        w2 = with_world(cfg, 2)
        ds = build_ds_config(w2, w2.distill, 2)
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
        assert ds["bf16"]["enabled"] is False
    cfg, data = prepare_task(with_world(cfg, 2))
    assert len(data.unlabeled) == (500 if task != "xcopa" else 40)
    if raw.task.k_shot:
        assert len(data.train) == raw.task.k_shot
    # The scorer the run would build, on the rendered views, per-language label words.
    scorer, tok, _ = load_scorer(
        family, data.model_source, data.num_labels, head=data.head,
        label_words=data.label_words, languages=data.prompt_languages,
    )  # fmt: skip
    assert scorer.num_labels == len(LABELS[task])
    for lang in data.languages[:3]:
        views = data.test.texts(lang)[:4]
        enc = encode_views(tok, views, cfg.model.max_length)
        ids = None
        if data.label_words is not None:
            ids = torch.full((4,), data.lang_id(lang), dtype=torch.long)
            if data.head == "cloze":
                mask = tok.mask_token_id
                assert ((enc["input_ids"] == mask).sum(-1) == 1).all(), views[0]
        with torch.no_grad():
            logits = scorer(enc["input_ids"], enc["attention_mask"], ids)
        assert logits.shape == (4, len(LABELS[task])) and torch.isfinite(logits).all()
    assert dataclasses.asdict(cfg)["model"]["head"] == raw.model.head
