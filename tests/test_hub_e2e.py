"""Hub tasks end to end, offline: local copies of the Hub repos (same layout and schema), the
real entry point under the real launcher on 2 ranks, both families and both XLM-R heads
through selection and distillation, and the report recomputed in one plain process.

Also the checks that must stop a run before any training: unknown task / language / split,
views that are not parallel, templates without a mask, overlapping splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest
import torch

from _hub_fixtures import make_copa_repo, make_hub_repo, vocabulary
from _launch import launch
from alsace_ds.config import ConfigError, load_config
from alsace_ds.data.corpus import DataError
from alsace_ds.data.tasks import prepare_task
from alsace_ds.data.tokens import encode_views
from alsace_ds.models.scorers import load_scorer
from alsace_ds.models.tiny import build_tiny_model

LANGS = ["en", "fr", "sw"]
N = 24  # rows per split and language
SPLITS = [
    "task.unlabeled_split=validation[:16]",
    "task.dev_split=validation[16:]",
    "task.test_split=test",
]


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory):
    """datasets' cache in a temporary folder (also for the launched ranks); no Hub calls."""
    hf = str(tmp_path_factory.mktemp("hf"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", hf)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", hf)
        yield


def _words(task: str, columns: tuple[str, ...], langs: list[str]) -> list[str]:
    return vocabulary(task, columns, langs, N)


@pytest.fixture(scope="module")
def xnli(tmp_path_factory):
    root = tmp_path_factory.mktemp("xnli")
    repo = make_hub_repo(root / "repo", "xnli", n=N, languages=LANGS)
    words = _words("xnli", ("premise", "hypothesis"), LANGS)
    labels = ["entailment", "neutral", "contradiction"]
    models = {
        "xlmr": build_tiny_model(root / "xlmr", "xlmr", words, labels),
        "mt5": build_tiny_model(
            root / "mt5", "mt5", words, labels, label_words=["Yes", "No"] + ["Maybe"]
        ),
    }
    return repo, models


def _base(repo: Path, model: Path, family: str, out: Path, head: str) -> list[str]:
    return [
        "task.name=xnli",
        f"task.source={repo}",
        f"task.languages=[{','.join(LANGS)}]",
        *SPLITS,
        f"model.family={family}",
        f"model.name_or_path={model}",
        f"model.head={head}",
        "model.dtype=fp32",
        "model.max_length=48",
        f"run.output_dir={out}",
        "stage0.epochs=2",
        "stage0.lr=1e-3",
        "stage0.micro_batch=4",
        "distill.max_steps=3",
        "distill.lr=1e-4",
        "distill.micro_batch=4",
        "log.progress=false",
    ]


@torch.no_grad()
def _recompute_accuracy(cfg_overrides: list[str], model_dir: Path) -> dict[str, float]:
    """Per-language test accuracy of ``model_dir`` in one process, no DeepSpeed: the same
    rendered views and label-word rows that the run used (prepare_task), one language at a time."""
    cfg, task = prepare_task(load_config(None, cfg_overrides))
    scorer, tok, _ = load_scorer(
        cfg.model.family, model_dir, task.num_labels, head=task.head,
        label_words=task.label_words, languages=task.prompt_languages,
    )  # fmt: skip
    labels = task.test.labels()
    acc = {}
    for lang in task.languages:
        enc = encode_views(tok, task.test.texts(lang), cfg.model.max_length)
        ids = None
        if task.label_words is not None:
            ids = torch.full((len(task.test),), task.lang_id(lang), dtype=torch.long)
        logits = scorer(enc["input_ids"], enc["attention_mask"], ids)
        acc[lang] = 100.0 * float((logits.argmax(-1) == labels).double().mean())
    return acc


@pytest.mark.launch
@pytest.mark.parametrize(
    "family,head", [("xlmr", "classification"), ("xlmr", "cloze"), ("mt5", "label_words")]
)
def test_xnli_two_ranks_report_equals_recomputation(xnli, tmp_path, cache, family, head):
    repo, models = xnli
    out = tmp_path / "run"
    args = _base(repo, models[family], family, out, head)
    res = launch(args, cache)
    assert res.returncode == 0, res.stdout[-6000:]
    report = json.loads((out / "report.json").read_text())
    assert report["head"] == head and report["languages"] == LANGS
    assert report["num_test_examples"] == N and report["num_unlabeled_examples"] == 16
    sel = json.loads((out / "selection.json").read_text())
    assert sel["teachers_used"] == report["teachers"] and report["teachers"]
    # Stage 2 started from the best stage-0 model by English dev accuracy.
    best = json.loads((out / "stage0" / "best.json").read_text())
    assert report["stage0_start"]["step"] == best["step"] and best["metric"] == "english"
    before = _recompute_accuracy(args, out / "stage0" / "best")
    after = _recompute_accuracy(args, out / "final" / "model")
    for lang in LANGS:
        assert report["before"]["accuracy"][lang] == pytest.approx(before[lang], abs=1e-9)
        assert report["after"]["accuracy"][lang] == pytest.approx(after[lang], abs=1e-9)
    # Paper-style tables, CSV = JSON cells; Table 2's avg column = the mean accuracy.
    rows = list(csv.reader((out / "table2.csv").open()))
    assert rows == report["tables"]["table2"] and rows[0] == ["model", *LANGS, "avg"]
    assert float(rows[1][-1]) == pytest.approx(sum(before.values()) / 3, abs=0.006)
    t3 = list(csv.reader((out / "table3.csv").open()))
    assert t3[0] == ["method", "avg(S)", "Δ(S)", "avg(T)", "Δ(T)", "avg(A)", "Δ(A)", "Δ(A)/|T|"]
    assert [r[0] for r in t3[1:]] == [models[family].name, "ALSACE"]
    assert any("xnli test: kept 24" in n for n in report["data_notes"])


# ----------------------------------------------------------------------------- refusals


def _prepare(overrides: list[str]):
    return prepare_task(load_config(None, overrides))


def test_unknown_task_language_split_are_config_errors(xnli):
    repo, models = xnli
    base = _base(repo, models["xlmr"], "xlmr", Path("unused"), "classification")
    with pytest.raises(ConfigError, match="task.name: 'xnly' is not one of"):
        load_config(None, [*base, "task.name=xnly"])
    with pytest.raises(ConfigError, match="'xx'"):
        _prepare([*base, "task.languages=[en,xx]"])
    with pytest.raises(ConfigError, match="task.test_split: .*'dev'"):
        _prepare([*base, "task.test_split=dev"])


def test_overlapping_splits_are_refused_unless_allowed(xnli):
    repo, models = xnli
    base = _base(repo, models["xlmr"], "xlmr", Path("unused"), "classification")
    overlap = [*base, "task.test_split=validation[:4]"]
    with pytest.raises(
        ConfigError, match="4 of 16 unlabeled examples .* share a view with the test"
    ):
        _prepare(overlap)
    _, task = _prepare([*overlap, "task.allow_overlap=true"])
    assert any(n.startswith("OVERLAP (allowed") for n in task.notes)


def test_views_not_parallel_name_language_and_row(tmp_path, xnli):
    _, models = xnli
    repo = make_hub_repo(tmp_path / "bad", "xnli", n=N, languages=LANGS, drop_rows={"sw": [5]})
    base = _base(repo, models["xlmr"], "xlmr", Path("unused"), "classification")
    with pytest.raises(DataError) as ei:
        _prepare(base)
    problems = ei.value.problems
    # sw lost row 5, so from there its rows are en's next ones: the missing row is named, and
    # the labels that no longer agree, row by row
    assert problems[0] == ("xnli validation [sw] row 23: absent ('sw' has 23 rows, 'en' has 24; "
                           "xnli languages are parallel by row position)")  # fmt: skip
    tail = " in 'en'; labels must agree across languages"
    rows = [int(p.split()[3][:-1]) for p in problems[1:] if p.endswith(tail)]
    assert len(rows) == len(problems) - 1 > 0 and min(rows) >= 5, problems


def test_template_without_mask_names_task_and_language(tmp_path, xnli):
    repo, models = xnli
    bad = tmp_path / "xnli.yaml"
    text_ = (
        Path(__file__).parent.parent / "alsace_ds" / "data" / "templates" / "xnli.yaml"
    ).read_text()
    bad.write_text(
        text_.replace('["{premise} ?", "{mask}, {hypothesis}"]', '["{premise} ?", "{hypothesis}"]')
    )
    base = _base(repo, models["xlmr"], "xlmr", Path("unused"), "cloze")
    with pytest.raises(ValueError) as ei:
        _prepare([*base, f"model.prompts_file={bad}"])
    assert str(ei.value) == (
        "prompts for task 'xnli': 1 problem:\n  - language 'fr': template ['{premise} ?', "
        "'{hypothesis}'] has no {mask}; the head reads the label words at exactly one mask"
    )


def test_unknown_label_word_is_an_error_before_training(tmp_path, xnli):
    repo, _ = xnli
    words = _words("xnli", ("premise", "hypothesis"), LANGS)
    model = build_tiny_model(
        tmp_path / "m", "xlmr", [w for w in words if w != "Oui"], ["a", "b", "c"]
    )
    base = _base(repo, model, "xlmr", Path("unused"), "cloze")
    with pytest.raises(ConfigError, match="verbalizer of language 'fr'.*Oui"):
        _prepare(base)


def test_xcopa_with_copa_english_training_has_no_gap(tmp_path, xnli):
    """XCOPA: 11 languages without English, stage 0 on COPA; accuracies only."""
    xcopa = make_hub_repo(tmp_path / "xcopa", "xcopa", n=N, languages=["it", "sw"])
    copa = make_copa_repo(tmp_path / "copa", n=N)
    _, models = xnli
    cfg, task = _prepare([
        "task.name=xcopa", f"task.source={xcopa}", f"task.train_source={copa}",
        "task.languages=[it,sw]", "task.unlabeled_split=validation[:12]",
        "task.test_split=test", f"model.name_or_path={models['xlmr']}",
    ])  # fmt: skip
    assert task.english is None and task.train_language == "en"
    assert task.prompt_languages == ["it", "sw", "en"]
    assert len(task.train) == N and task.train.languages == ["en"]
    # the classification head reads (premise + question phrase, numbered choices)
    view = task.test.examples[0].views["it"]
    assert isinstance(view, tuple) and len(view) == 2 and "1:" in view[1] and "2:" in view[1]
