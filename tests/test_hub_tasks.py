"""Loaders for XNLI / PAWS-X / XCOPA (+ COPA) by name, on local copies of the Hub repos.

The fixtures (tests/_hub_fixtures.py) write the Hub layout (README ``configs:`` + parquet per
config and split), so every load below goes through the real ``datasets.load_dataset(dir,
config, split=split)`` call, offline.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from _hub_fixtures import (
    labels,
    make_copa_repo,
    make_hub_repo,
    question,
    text,
)
from alsace_ds.data.corpus import DataError
from alsace_ds.data.hub import (
    ABSENT,
    LABEL_MISSING,
    PLACEHOLDER,
    TASKS,
    check_request,
    load_english_train,
    load_task_split,
)


@pytest.fixture(scope="module", autouse=True)
def _hf_cache(tmp_path_factory):
    """A private datasets cache: nothing written to (or read from) ~/.cache/huggingface."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf")))
        yield


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {
        "xnli": make_hub_repo(root / "xnli", "xnli"),
        "pawsx": make_hub_repo(root / "pawsx", "pawsx", shuffle=["de", "ja"]),
        "xcopa": make_hub_repo(root / "xcopa", "xcopa", shuffle=["it"]),
        "copa": make_copa_repo(root / "copa"),
    }


def pair(task: str, cols: tuple[str, str], i: int, lang: str, split: str) -> tuple[str, str]:
    return (text(task, cols[0], i, lang, split), text(task, cols[1], i, lang, split))


def choice(task: str, i: int, lang: str, split: str) -> tuple[str, str, str, str]:
    return (
        text(task, "premise", i, lang, split),
        question(i),
        text(task, "choice1", i, lang, split),
        text(task, "choice2", i, lang, split),
    )


def parquet_column(repo: Path, config: str, split: str, column: str) -> list:
    return pq.read_table(repo / config / f"{split}-00000-of-00001.parquet")[column].to_pylist()


# ------------------------------------------------------------------------------------ XNLI


@pytest.mark.parametrize("split", ["test", "validation"])
def test_xnli_parallel_by_row_position(repos, split):
    langs = ["fr", "en", "sw"]
    corpus, report = load_task_split("xnli", split, langs, source=repos["xnli"])
    assert corpus.path == f"{repos['xnli']}[{split}]"
    assert corpus.languages == langs
    assert corpus.label_names == ["entailment", "neutral", "contradiction"]
    assert corpus.ids == [f"{split}-{i}" for i in range(12)]
    for lang in langs:
        assert corpus.texts(lang) == [
            pair("xnli", ("premise", "hypothesis"), i, lang, split) for i in range(12)
        ]
    assert corpus.labels().tolist() == labels("xnli", 12, split=split)
    assert all(
        type(v) is tuple and len(v) == 2 and all(type(s) is str for s in v)
        for ex in corpus.examples
        for v in ex.views.values()
    )
    assert report.kept == 12
    assert report.dropped == {"fr": {}, "en": {}, "sw": {}}
    assert report.rows == {"fr": 12, "en": 12, "sw": 12}
    assert report.lines() == [f"xnli {split}: kept 12 of 12 rows; nothing dropped"]


def test_xnli_english_train(repos):
    corpus, report = load_english_train("xnli", source=repos["xnli"])
    assert corpus.path == f"{repos['xnli']}:en[train]"
    assert corpus.languages == ["en"]
    assert corpus.ids == [f"train-{i}" for i in range(12)]
    assert corpus.texts("en") == [
        pair("xnli", ("premise", "hypothesis"), i, "en", "train") for i in range(12)
    ]
    assert corpus.labels().tolist() == labels("xnli", 12, split="train")
    assert report.kept == 12 and report.dropped == {"en": {}}


def test_xnli_language_with_a_row_fewer_is_an_error(tmp_path):
    repo = make_hub_repo(tmp_path, "xnli", languages=["en", "fr", "de"], drop_rows={"de": [11]})
    with pytest.raises(DataError) as info:
        load_task_split("xnli", "test", ["en", "fr", "de"], source=repo)
    err = info.value
    assert err.path == f"{repo}[test]"
    assert err.problems == [
        "xnli test [de] row 11: absent ('de' has 11 rows, 'en' has 12; xnli languages are "
        "parallel by row position)"
    ]


def test_xnli_differing_label_is_an_error(tmp_path):
    repo = make_hub_repo(tmp_path, "xnli", languages=["en", "fr", "de"], flip_label={"fr": [4]})
    gold = labels("xnli", 12)
    with pytest.raises(DataError) as info:
        load_task_split("xnli", "test", ["en", "fr", "de"], source=repo)
    assert info.value.problems == [
        f"xnli test row 4: label {(gold[4] + 1) % 3} in 'fr' but {gold[4]} in 'en'; labels "
        f"must agree across languages"
    ]


def test_xnli_max_examples(repos):
    corpus, report = load_task_split(
        "xnli", "test", ["en", "de"], source=repos["xnli"], max_examples=2
    )
    assert corpus.ids == ["test-0", "test-1"]
    assert corpus.labels().tolist() == labels("xnli", 12)[:2]
    assert (report.kept, report.truncated) == (2, 10)
    assert report.lines()[0] == (
        "xnli test: kept 2 of 12 rows (max_examples: first 2 of 12 joinable); nothing dropped"
    )


# ---------------------------------------------------------------------------------- PAWS-X


def test_pawsx_joins_on_id_not_row_position(repos):
    repo = repos["pawsx"]
    de_ids = parquet_column(repo, "de", "test", "id")
    assert de_ids != list(range(1, 13)) and sorted(de_ids) == list(range(1, 13))  # shuffled

    corpus, report = load_task_split("pawsx", "test", ["en", "de", "ja"], source=repo)
    gold = labels("pawsx", 12)
    assert corpus.path == f"{repo}[test]"
    assert corpus.ids == [str(i) for i in range(1, 13)]  # the first language's order
    for lang in ["en", "de", "ja"]:
        assert corpus.texts(lang) == [
            pair("pawsx", ("sentence1", "sentence2"), i, lang, "test") for i in range(1, 13)
        ]
    assert corpus.labels().tolist() == gold
    assert corpus.label_names == ["not_paraphrase", "paraphrase"]
    assert report.kept == 12 and report.dropped == {"en": {}, "de": {}, "ja": {}}

    # With the shuffled language first, its row order is the example order.
    corpus, _ = load_task_split("pawsx", "test", ["de", "en"], source=repo)
    assert corpus.ids == [str(i) for i in de_ids]
    assert corpus.texts("en") == [
        pair("pawsx", ("sentence1", "sentence2"), i, "en", "test") for i in de_ids
    ]
    assert corpus.labels().tolist() == [gold[i - 1] for i in de_ids]

    corpus, _ = load_task_split("pawsx", "test", ["de", "en"], source=repo, max_examples=3)
    assert corpus.ids == [str(i) for i in de_ids[:3]]


def test_pawsx_drops_are_reported_per_language_and_reason(tmp_path):
    # positions (id = position + 1): 1, 2 label -1 in de (2 is also "NS": label counts first);
    # 3 "NS" and 4 whitespace in ja; 5 missing from fr; 6 empty sentence2 in ko.
    repo = make_hub_repo(
        tmp_path,
        "pawsx",
        label_minus1={"de": [1, 2]},
        placeholder={"ja": {3: "NS", 4: "   "}, "de": {2: "NS"}, "ko": {6: ("sentence2", "")}},
        drop_rows={"fr": [5]},
        shuffle=["de", "ko"],
    )
    langs = ["en", "de", "ja", "fr", "ko"]
    corpus, report = load_task_split("pawsx", "test", langs, source=repo)
    kept_pos = [0, 7, 8, 9, 10, 11]
    assert corpus.ids == [str(p + 1) for p in kept_pos]
    assert corpus.labels().tolist() == [labels("pawsx", 12)[p] for p in kept_pos]
    assert corpus.texts("ko") == [
        pair("pawsx", ("sentence1", "sentence2"), p + 1, "ko", "test") for p in kept_pos
    ]
    assert report.kept == 6
    assert report.rows == {"en": 12, "de": 12, "ja": 12, "fr": 11, "ko": 12}
    assert report.dropped == {
        "en": {ABSENT: 6},
        "de": {LABEL_MISSING: 2, ABSENT: 4},
        "ja": {PLACEHOLDER: 2, ABSENT: 4},
        "fr": {ABSENT: 5},
        "ko": {PLACEHOLDER: 1, ABSENT: 5},
    }
    assert report.lines() == [
        "pawsx test: kept 6 of 11-12 rows",
        "  en: 6 absent in another language",
        "  de: 2 label -1, 4 absent in another language",
        "  ja: 2 placeholder text, 4 absent in another language",
        "  fr: 5 absent in another language",
        "  ko: 1 placeholder text, 5 absent in another language",
    ]

    # Only the requested languages count: de alone loses just its label -1 rows.
    corpus, report = load_task_split("pawsx", "test", ["de"], source=repo)
    assert sorted(int(i) for i in corpus.ids) == [i for i in range(1, 13) if i not in (2, 3)]
    assert report.dropped == {"de": {LABEL_MISSING: 2}}


def test_pawsx_unlabeled_keeps_label_minus1_rows(tmp_path):
    gold = labels("pawsx", 12)
    repo = make_hub_repo(tmp_path / "a", "pawsx", languages=["en", "de"], label_minus1={"de": [1]})
    corpus, report = load_task_split(
        "pawsx", "test", ["en", "de"], source=repo, require_label=False
    )
    assert report.kept == 12 and report.dropped == {"en": {}, "de": {}}
    assert corpus.labels().tolist() == gold  # the label known from en
    _, report = load_task_split("pawsx", "test", ["en", "de"], source=repo)
    assert report.dropped == {"en": {ABSENT: 1}, "de": {LABEL_MISSING: 1}}

    # -1 in every language: kept, and the corpus comes back unlabeled.
    repo = make_hub_repo(
        tmp_path / "b", "pawsx", languages=["en", "de"], label_minus1={"de": [1], "en": [1]}
    )
    corpus, report = load_task_split(
        "pawsx", "test", ["en", "de"], source=repo, require_label=False
    )
    assert len(corpus) == 12 and corpus.labels() is None
    assert all(ex.label is None for ex in corpus.examples)
    assert report.notes and "unlabeled" in report.notes[0]


def test_pawsx_label_mismatch_names_id_and_languages(tmp_path):
    repo = make_hub_repo(tmp_path, "pawsx", languages=["en", "de"], flip_label={"de": [3]})
    gold = labels("pawsx", 12)
    with pytest.raises(DataError) as info:
        load_task_split("pawsx", "test", ["en", "de"], source=repo)
    assert info.value.problems == [
        f"pawsx test id '4': label {1 - gold[3]} in 'de' (row 3) but {gold[3]} in 'en' "
        f"(row 3); labels must agree across languages"
    ]


def test_pawsx_english_train(repos):
    corpus, report = load_english_train("pawsx", source=repos["pawsx"])
    assert corpus.languages == ["en"]
    assert corpus.ids == [str(i) for i in range(1, 13)]
    assert corpus.texts("en")[0] == ("sentence1 1 in en (train)", "sentence2 1 in en (train)")
    assert corpus.labels().tolist() == labels("pawsx", 12, split="train")


# ----------------------------------------------------------------------------------- XCOPA


def test_xcopa_joins_on_idx_with_choice_views(repos):
    repo = repos["xcopa"]
    assert parquet_column(repo, "it", "test", "idx") != list(range(12))  # shuffled
    langs = ["et", "it", "zh"]
    corpus, report = load_task_split("xcopa", "test", langs, source=repo)
    assert corpus.ids == [str(i) for i in range(12)]
    assert corpus.label_names == ["choice1", "choice2"]
    for lang in langs:
        assert corpus.texts(lang) == [choice("xcopa", i, lang, "test") for i in range(12)]
    assert corpus.labels().tolist() == labels("xcopa", 12)
    assert all(
        type(v) is tuple and len(v) == 4 and all(type(s) is str for s in v)
        for ex in corpus.examples
        for v in ex.views.values()
    )
    assert report.kept == 12 and report.dropped == {lang: {} for lang in langs}


def test_xcopa_question_must_agree(tmp_path):
    repo = make_hub_repo(tmp_path, "xcopa", languages=["et", "it"], flip_question={"it": [2]})
    with pytest.raises(DataError) as info:
        load_task_split("xcopa", "validation", ["et", "it"], source=repo)
    assert info.value.problems == [
        "xcopa validation idx '2': question 'effect' in 'it' (row 2) but 'cause' in 'et' "
        "(row 2); question must agree across languages"
    ]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_copa_is_the_xcopa_english_train(repos, split):
    corpus, report = load_english_train("xcopa", source=repos["copa"], split=split)
    assert corpus.path == f"{repos['copa']}:copa[{split}]"
    assert corpus.languages == ["en"]
    assert corpus.label_names == ["choice1", "choice2"]
    assert corpus.ids == [str(i) for i in range(8)]
    assert corpus.texts("en") == [choice("copa", i, "en", split) for i in range(8)]
    assert corpus.labels().tolist() == labels("copa", 8, split=split)
    assert report.kept == 8 and report.dropped == {"en": {}}


def test_copa_label_minus1_is_never_gold(tmp_path, repos):
    with pytest.raises(ValueError, match=r"unknown split 'test'.*labels are hidden \(-1\)"):
        load_english_train("xcopa", source=repos["copa"], split="test")
    repo = make_copa_repo(tmp_path, label_minus1={"en": [2]})
    corpus, report = load_english_train("xcopa", source=repo)
    assert corpus.ids == [str(i) for i in range(8) if i != 2]
    assert report.dropped == {"en": {LABEL_MISSING: 1}}


# ------------------------------------------------------------------ requests and sources


def test_bad_requests_fail_before_loading(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", no_load)
    with pytest.raises(ValueError, match=r"unknown task 'xnlii' \(valid tasks: xnli, pawsx, xcopa"):
        load_task_split("xnlii", "test", ["en"])
    with pytest.raises(ValueError) as info:
        load_task_split("xcopa", "test", ["et", "en", "xx"])
    msg = str(info.value)
    assert "unknown languages 'en', 'xx' for xcopa (valid: et, ht, id, it, qu, sw, ta" in msg
    assert "aps/super_glue (copa)" in msg
    with pytest.raises(ValueError, match=r"unknown split 'train' for xcopa \(valid: validation, "):
        load_task_split("xcopa", "train", ["et"])
    with pytest.raises(ValueError, match="unknown split 'dev' for pawsx"):
        check_request("pawsx", "dev", ["en"])
    with pytest.raises(ValueError, match="list of language codes"):
        load_task_split("pawsx", "test", "en")
    with pytest.raises(ValueError, match="must not be empty"):
        load_task_split("pawsx", "test", [])
    with pytest.raises(ValueError, match=r"duplicated: \['fr'\]"):
        load_task_split("pawsx", "test", ["fr", "en", "fr"])
    with pytest.raises(ValueError, match="max_examples"):
        load_task_split("pawsx", "test", ["en"], max_examples=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_english_train("xnli", split="dev")
    check_request("xnli", "validation", list(TASKS["xnli"].languages))  # all fine


def test_default_source_is_the_hub_id_through_the_same_call(monkeypatch, repos):
    calls = []
    real = datasets.load_dataset

    def fake_hub(path, name, split):
        calls.append((path, name, split))
        hub = {"facebook/xnli": repos["xnli"], "aps/super_glue": repos["copa"]}
        return real(str(hub.get(path, path)), name, split=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    corpus, _ = load_task_split("xnli", "test", ["en", "fr"])
    assert calls == [("facebook/xnli", "en", "test"), ("facebook/xnli", "fr", "test")]
    assert corpus.path == "hf:facebook/xnli[test]"
    assert corpus.texts("fr")[3] == ("premise 3 in fr (test)", "hypothesis 3 in fr (test)")

    calls.clear()
    corpus, report = load_english_train("xcopa")
    assert calls == [("aps/super_glue", "copa", "train")]
    assert corpus.path == "hf:aps/super_glue:copa[train]"
    assert report.notes == ["English training data of xcopa: hf:aps/super_glue:copa[train]"]

    calls.clear()
    load_task_split("xnli", "test", ["en"], source=str(repos["xnli"]))
    assert calls == [(str(repos["xnli"]), "en", "test")]  # a local dir: the very same call


def test_source_problems_are_data_errors(tmp_path, repos):
    with pytest.raises(DataError, match=r"xnli test \[en\]: source '/no/such/dir' is not a dir"):
        load_task_split("xnli", "test", ["en"], source="/no/such/dir")
    repo = make_hub_repo(tmp_path, "pawsx", languages=["en", "fr"])
    with pytest.raises(DataError) as info:
        load_task_split("pawsx", "test", ["en", "de"], source=repo)
    assert info.value.problems[0].startswith(
        f"pawsx test [de]: load_dataset('{repo}', 'de', split='test') failed: ValueError: "
    )
    with pytest.raises(DataError) as info:
        load_task_split("xnli", "test", ["en"], source=repos["pawsx"])
    assert info.value.problems == [
        "xnli test [en]: columns premise, hypothesis missing from config 'en' (it has id, "
        "sentence1, sentence2, label)"
    ]
