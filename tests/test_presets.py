"""Every preset in configs/presets loads, resolves its batch sizes on 1-8 ranks, and prepares
its task end to end with the Hub names swapped for local copies of the same schema (datasets
and tiny models): splits disjoint, templates rendered, verbalizers known, the scorer built."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch

from _hub_fixtures import LANGUAGES, make_copa_repo, make_hub_repo, vocabulary
from alsace_ds.config import config_path, load_config, preset_names, with_world
from alsace_ds.ds_config import build_ds_config
from alsace_ds.models import encode_views, load_scorer
from alsace_ds.tasks import prepare_task
from alsace_ds.tiny import build_tiny_model

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


@pytest.mark.parametrize("name", preset_names())
def test_preset(name, local, tmp_path):
    repos, models = local
    raw = load_config(config_path(name))
    task, family = raw.task.name, raw.model.family
    assert raw.model.name_or_path.startswith(("xlm-roberta", "google/mt5"))  # Hub names
    assert raw.distill.lr == 3e-8 and raw.model.dropout == 0.1  # paper appendix A.1
    assert raw.task.max_unlabeled == 500
    swap = [
        f"model.name_or_path={models[task, family]}",
        f"task.source={repos[task]}",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    if task == "xcopa":
        swap.append(f"task.train_source={repos['copa']}")
    cfg = load_config(config_path(name), swap)
    for world in (1, 2, 4, 8):  # the paper's batch of 32 on any of these
        w = with_world(cfg, world)
        for stage in (w.stage0, w.distill):
            ds = build_ds_config(w, stage, world)
            assert ds["train_batch_size"] == stage.micro_batch * stage.grad_accum * world
        assert w.distill.micro_batch * w.distill.grad_accum * world == 32
    if family == "mt5":
        assert cfg.model.resolved_dtype == "bf16"
        assert build_ds_config(with_world(cfg, 2), cfg.distill, 2)["bf16"]["enabled"] is True
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
