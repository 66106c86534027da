"""Tests for the parallel JSONL format: loading, every validation error, k_shot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alsace_ds.data.corpus import (
    MAX_REPORTED,
    DataError,
    ParallelCorpus,
    ParallelExample,
    k_shot,
    load_parallel_jsonl,
)

LANGS = ["en", "fr"]
LABELS = ["entailment", "neutral", "contradiction"]


def write(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written verbatim)."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(i: int, label=0, **text) -> dict:
    return {
        "id": f"ex-{i}",
        "label": label,
        "text": text or {"en": f"hello {i}", "fr": f"salut {i}"},
    }


def load(path: Path, require_label: bool = True, **kw) -> ParallelCorpus:
    return load_parallel_jsonl(path, LANGS, LABELS, require_label=require_label, **kw)


def problems_of(path: Path, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        load(path, **kw)
    return info.value


# ---------------------------------------------------------------------------- valid files


def test_valid_single_file_loads(tmp_path):
    path = write(
        tmp_path,
        [
            {"id": "a", "label": 2, "text": {"en": "one", "fr": "un"}},
            "",  # blank lines are skipped
            {"id": 7, "label": "neutral", "text": {"fr": "deux", "en": "two"}},
            {"label": 0, "text": {"en": "three", "fr": "trois"}, "source": "ignored"},
        ],
    )
    corpus = load(path)
    assert len(corpus) == 3
    assert corpus.path == str(path)
    assert corpus.languages == LANGS
    assert corpus.label_names == LABELS
    assert corpus.ids == ["a", "7", "4"]  # default id = 1-based line number
    assert corpus.texts("en") == ["one", "two", "three"]
    assert corpus.texts("fr") == ["un", "deux", "trois"]
    assert corpus.labels().tolist() == [2, 1, 0]
    assert corpus.labels().dtype == torch.long
    assert not corpus.is_pair
    assert corpus.examples[0] == ParallelExample(id="a", views={"en": "one", "fr": "un"}, label=2)
    with pytest.raises(KeyError, match="'de'"):
        corpus.texts("de")


def test_valid_pair_file_loads(tmp_path):
    path = write(
        tmp_path,
        [
            {
                "id": "p1",
                "label": "contradiction",
                "text": {"en": ["A", "B"], "fr": ["Un", "Deux"]},
            },
            {"id": "p2", "label": 1, "text": {"en": ["C", "D"], "fr": ["Trois", "Quatre"]}},
        ],
    )
    corpus = load(path)
    assert corpus.is_pair
    assert corpus.texts("en") == [("A", "B"), ("C", "D")]
    assert corpus.texts("fr")[1] == ("Trois", "Quatre")
    assert corpus.labels().tolist() == [2, 1]


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    lines = [json.dumps(row(1)), json.dumps(row(2, label="neutral"))]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    corpus = load(path)
    assert corpus.ids == ["ex-1", "ex-2"]
    assert corpus.labels().tolist() == [0, 1]


def test_unlabeled_file_has_no_labels(tmp_path):
    path = write(tmp_path, [{"text": {"en": "x", "fr": "y"}}, {"text": {"en": "z", "fr": "w"}}])
    corpus = load(path, require_label=False)
    assert corpus.labels() is None
    assert [ex.label for ex in corpus.examples] == [None, None]
    assert corpus.ids == ["1", "2"]


def test_extra_languages_ignore_drops_keys(tmp_path):
    path = write(tmp_path, [{"label": 1, "text": {"en": "only english", "de": "x", "fr": "y"}}])
    corpus = load_parallel_jsonl(path, ["en"], LABELS, require_label=True, extra_languages="ignore")
    assert corpus.languages == ["en"]
    assert corpus.examples[0].views == {"en": "only english"}


def test_max_examples_reads_only_the_first_rows(tmp_path):
    path = write(tmp_path, [row(1), row(2), row(3), "{broken"])
    corpus = load(path, max_examples=2)
    assert corpus.ids == ["ex-1", "ex-2"]


def test_subset(tmp_path):
    corpus = load(write(tmp_path, [row(i, label=i % 3) for i in range(1, 6)]))
    sub = corpus.subset([4, 0])
    assert sub.ids == ["ex-5", "ex-1"]
    assert sub.labels().tolist() == [2, 1]
    assert sub.languages == LANGS and sub.label_names == LABELS
    assert corpus.subset(torch.tensor([1])).ids == ["ex-2"]
    with pytest.raises(IndexError):
        corpus.subset([5])


# ---------------------------------------------------------------------------- bad inputs


def test_file_not_found(tmp_path):
    path = tmp_path / "nope.jsonl"
    err = problems_of(path)
    assert str(path) in str(err)
    assert "file not found" in str(err)
    assert err.problems == [f"{path}: file not found"]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    err = problems_of(path)
    assert err.problems == [f"{path}: no examples (the file is empty)"]
    path.write_text("\n  \n")
    assert "no examples (the file has only blank lines)" in str(problems_of(path))


def test_invalid_json(tmp_path):
    path = write(tmp_path, [row(1), '{"id": "ex-2", "text": {'])
    err = problems_of(path)
    assert err.total == 1
    assert err.problems[0].startswith(f"{path}:2: invalid JSON (")


def test_row_not_an_object(tmp_path):
    path = write(tmp_path, [row(1), "[1, 2]"])
    err = problems_of(path)
    assert err.problems == [f"{path}:2: the row is a list, expected a JSON object"]


def test_missing_text(tmp_path):
    path = write(tmp_path, [{"id": "ex-1", "label": 0}])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:1 (id 'ex-1'): text is missing (expected an object mapping language -> view)"
    ]


def test_text_not_an_object(tmp_path):
    path = write(tmp_path, [{"id": "ex-1", "label": 0, "text": "hello"}])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:1 (id 'ex-1'): text is a string, expected an object mapping language -> view"
    ]


def test_missing_language(tmp_path):
    path = write(tmp_path, [row(1), row(17, en="only english")])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:2 (id 'ex-17'): text.fr is missing (language 'fr' is configured but absent "
        "from this row)"
    ]


def test_unknown_language(tmp_path):
    path = write(tmp_path, [row(1, en="a", fr="b", de="c")])
    err = problems_of(path)
    assert err.total == 1
    msg = err.problems[0]
    assert msg.startswith(f"{path}:1 (id 'ex-1'): text.de is an unknown language")
    assert "language 'de' is not configured" in msg
    assert "en, fr" in msg


@pytest.mark.parametrize("bad", ["", "   \t", "\n"])
def test_empty_text(tmp_path, bad):
    path = write(tmp_path, [row(3, en="fine", fr=bad)])
    err = problems_of(path)
    assert err.problems == [f"{path}:1 (id 'ex-3'): text.fr is empty or whitespace-only"]


def test_empty_text_inside_pair(tmp_path):
    path = write(tmp_path, [row(1, en=["p", "h"], fr=["p", " "])])
    err = problems_of(path)
    assert err.problems == [f"{path}:1 (id 'ex-1'): text.fr[1] is empty or whitespace-only"]


def test_view_of_wrong_type(tmp_path):
    path = write(tmp_path, [row(1, en="fine", fr=42)])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:1 (id 'ex-1'): text.fr is a number, expected a string or a 2-element list "
        '["premise", "hypothesis"]'
    ]


def test_pair_element_of_wrong_type(tmp_path):
    path = write(tmp_path, [row(1, en=["p", "h"], fr=["p", None])])
    err = problems_of(path)
    assert err.problems == [f"{path}:1 (id 'ex-1'): text.fr[1] is null, expected a string"]


@pytest.mark.parametrize("pair", [["only one"], ["a", "b", "c"], []])
def test_pair_of_wrong_length(tmp_path, pair):
    path = write(tmp_path, [row(1, en=["p", "h"], fr=pair)])
    err = problems_of(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(
        f"{path}:1 (id 'ex-1'): text.fr is a list of {len(pair)} element(s)"
    )


def test_mixed_single_and_pair_views(tmp_path):
    path = write(tmp_path, [row(1), row(2, en=["p", "h"], fr=["p", "h"])])
    err = problems_of(path)
    assert err.total == 2
    assert err.problems[0].startswith(
        f"{path}:2 (id 'ex-2'): text.en is a sentence pair but text.en on line 1 is a string"
    )
    assert err.problems[1].startswith(f"{path}:2 (id 'ex-2'): text.fr is a sentence pair")


@pytest.mark.parametrize("label", [3, -1])
def test_label_out_of_range(tmp_path, label):
    path = write(tmp_path, [row(1), row(2, label=label)])
    err = problems_of(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(
        f"{path}:2 (id 'ex-2'): label {label} is out of range (label must be in 0..2"
    )


def test_unknown_label_name(tmp_path):
    path = write(tmp_path, [row(1, label="maybe")])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:1 (id 'ex-1'): label 'maybe' is not a known label name (labels: entailment, "
        "neutral, contradiction)"
    ]


@pytest.mark.parametrize("label,shown", [(1.0, "a number 1.0"), (True, "a boolean true")])
def test_label_of_wrong_type(tmp_path, label, shown):
    path = write(tmp_path, [row(1, label=label)])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:1 (id 'ex-1'): label is {shown}, expected an int index or a label name"
    ]


def test_missing_label_when_required(tmp_path):
    path = write(tmp_path, [{"id": "ex-1", "text": {"en": "a", "fr": "b"}}])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:1 (id 'ex-1'): label is missing (this file must be labeled; labels: "
        "entailment, neutral, contradiction)"
    ]
    assert load(path, require_label=False).labels() is None


def test_partially_labeled_file(tmp_path):
    path = write(tmp_path, [row(1), {"id": "ex-2", "text": {"en": "a", "fr": "b"}}])
    err = problems_of(path, require_label=False)
    assert err.problems == [
        f"{path}:2 (id 'ex-2'): label is missing (1 of 2 rows have a label; 1 do not; label "
        "every row or none)"
    ]


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, [row(1), row(2), row(1)])
    err = problems_of(path)
    assert err.problems == [
        f"{path}:3 (id 'ex-1'): id 'ex-1' is a duplicate (first used on line 1)"
    ]


def test_default_id_can_clash_with_explicit_id(tmp_path):
    no_id = {"label": 0, "text": {"en": "c", "fr": "d"}}
    path = write(tmp_path, [{"id": "3", "label": 0, "text": {"en": "a", "fr": "b"}}, row(9), no_id])
    err = problems_of(path)
    assert err.problems == [f"{path}:3 (id '3'): id '3' is a duplicate (first used on line 1)"]


def test_bad_id(tmp_path):
    path = write(tmp_path, [{"id": ["x"], "label": 0, "text": {"en": "a", "fr": "b"}}])
    err = problems_of(path)
    assert err.problems == [f'{path}:1: id is a list ["x"], expected a string']


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(row(1)).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    err = problems_of(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(f"{path}:2: not valid UTF-8")


def test_several_problems_reported_together(tmp_path):
    path = write(
        tmp_path,
        [
            row(1),
            row(2, en="x"),  # fr missing
            row(3, label=9),  # label out of range
            "not json",
            row(5, en="y", fr=" ", xx="z"),  # empty fr + unknown language
            row(2),  # duplicate id
        ],
    )
    err = problems_of(path)
    assert err.total == 6
    text = str(err)
    assert text.splitlines()[0] == f"6 problems in {path}:"
    expected_fragments = [
        f"{path}:2 (id 'ex-2'): text.fr is missing",
        f"{path}:3 (id 'ex-3'): label 9 is out of range",
        f"{path}:4: invalid JSON",
        f"{path}:5 (id 'ex-5'): text.fr is empty or whitespace-only",
        f"{path}:5 (id 'ex-5'): text.xx is an unknown language",
        f"{path}:6 (id 'ex-2'): id 'ex-2' is a duplicate (first used on line 2)",
    ]
    assert len(err.problems) == len(expected_fragments)
    for got, want in zip(err.problems, expected_fragments, strict=True):
        assert got.startswith(want), (got, want)


def test_problem_list_is_capped(tmp_path):
    path = write(tmp_path, ["oops"] * 30)
    err = problems_of(path)
    assert err.total == 30
    assert len(err.problems) == MAX_REPORTED == 20
    assert str(err).splitlines()[0] == f"30 problems in {path} (showing the first 20):"
    assert err.problems[-1].startswith(f"{path}:20: invalid JSON")


@pytest.mark.parametrize(
    "languages,labels,match",
    [
        ([], LABELS, "languages must not be empty"),
        (["en", "en"], LABELS, r"languages must be unique; duplicated: \['en'\]"),
        (["en", ""], LABELS, "languages must be non-empty strings"),
        ("en", LABELS, "languages must be a list of strings"),
        (LANGS, [], "label_names must not be empty"),
        (LANGS, ["a", "b", "a"], r"label_names must be unique; duplicated: \['a'\]"),
    ],
)
def test_invalid_arguments(tmp_path, languages, labels, match):
    path = write(tmp_path, [row(1)])
    with pytest.raises(ValueError, match=match):
        load_parallel_jsonl(path, languages, labels, require_label=True)


def test_invalid_keyword_arguments(tmp_path):
    path = write(tmp_path, [row(1)])
    with pytest.raises(ValueError, match="extra_languages"):
        load(path, extra_languages="drop")
    with pytest.raises(ValueError, match="max_examples"):
        load(path, max_examples=0)


# ---------------------------------------------------------------------------- k_shot


def test_k_shot_is_deterministic(tmp_path):
    corpus = load(write(tmp_path, [row(i, label=i % 3) for i in range(1, 101)]))
    a = k_shot(corpus, 10, seed=3)
    b = k_shot(corpus, 10, seed=3)
    c = k_shot(corpus, 10, seed=4)
    assert len(a) == 10
    assert a.ids == b.ids
    assert a.ids != c.ids
    assert len(set(a.ids)) == 10
    # kept in file order, a subset of the corpus, labels follow their examples
    positions = [corpus.ids.index(i) for i in a.ids]
    assert positions == sorted(positions)
    assert a.labels().tolist() == [corpus.examples[p].label for p in positions]
    # independent of the global RNG state
    import random

    random.seed(123)
    torch.manual_seed(123)
    assert k_shot(corpus, 10, seed=3).ids == a.ids
    assert k_shot(corpus, 100, seed=0).ids == corpus.ids


def test_k_shot_errors(tmp_path):
    corpus = load(write(tmp_path, [row(i) for i in range(1, 4)]))
    with pytest.raises(ValueError, match="k=4 is larger than the corpus .* \\(3 examples\\)"):
        k_shot(corpus, 4, seed=0)
    with pytest.raises(ValueError, match="positive"):
        k_shot(corpus, 0, seed=0)
