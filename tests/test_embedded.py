"""Tests for the embedded default task: determinism, race safety, format, overlap, balance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from alsace_ds.data.corpus import load_parallel_jsonl
from alsace_ds.data.embedded import (
    EMBEDDED_LABELS,
    EMBEDDED_LANGUAGES,
    KEYWORDS,
    RECOMMENDED,
    EmbeddedSpec,
    build_embedded,
    spec_hash,
    translate,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = EmbeddedSpec(n_train=60, n_unlabeled=30, n_dev=15, n_test=45, hidden=16, ffn=32)
DATA_FILES = ("train.jsonl", "unlabeled.jsonl", "dev.jsonl", "test.jsonl", "lexicon.json")


@pytest.fixture(scope="module")
def default_assets(tmp_path_factory):
    return build_embedded(tmp_path_factory.mktemp("emb"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_default_layout_and_names(default_assets):
    a = default_assets
    assert a.root.name == f"embedded-xlmr-{spec_hash(EmbeddedSpec(), 'xlmr')}"
    assert a.languages == ["en", "qaa", "qab", "qac", "qad", "qae", "qaf"]
    assert a.label_names == ["sports", "politics", "science"] == a.label_words
    for p in (a.train_file, a.unlabeled_file, a.dev_file, a.test_file, a.lexicon_file):
        assert p.is_file() and p.parent == a.root
    assert (a.model_dir / "config.json").is_file()
    assert (a.model_dir / "tokenizer.json").is_file()
    assert not [p for p in a.root.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert a.root.stat().st_mode & 0o777 == 0o755


def test_files_load_with_the_data_format(default_assets):
    a = default_assets
    langs, labels = a.languages, a.label_names
    train = load_parallel_jsonl(a.train_file, ["en"], labels, require_label=True)
    unl = load_parallel_jsonl(a.unlabeled_file, langs, labels, require_label=False)
    dev = load_parallel_jsonl(a.dev_file, langs, labels, require_label=True)
    test = load_parallel_jsonl(a.test_file, langs, labels, require_label=True)
    spec = EmbeddedSpec()
    assert (len(train), len(unl), len(dev), len(test)) == (2000, 500, 300, 1000)
    assert (spec.n_train, spec.n_unlabeled, spec.n_dev, spec.n_test) == (2000, 500, 300, 1000)
    # the training file holds English only; the unlabeled file has no labels at all
    assert all(set(row["text"]) == {"en"} for row in read_jsonl(a.train_file))
    assert unl.labels() is None
    assert not any("label" in row for row in read_jsonl(a.unlabeled_file))
    # ids are unique across the whole task, and sentences never repeat across splits
    ids = train.ids + unl.ids + dev.ids + test.ids
    assert len(set(ids)) == len(ids) == 3800
    english = train.texts("en") + unl.texts("en") + dev.texts("en") + test.texts("en")
    assert len(set(english)) == 3800
    for corpus in (train, unl, dev, test):
        for text in corpus.texts("en"):
            assert 8 <= len(text.split()) <= 16


def test_parallel_views_are_translations_of_the_same_row(default_assets):
    a = default_assets
    lex = json.loads(a.lexicon_file.read_text())
    for path in (a.unlabeled_file, a.dev_file, a.test_file):
        for row in read_jsonl(path):
            words = row["text"]["en"].split()
            assert list(row["text"]) == list(EMBEDDED_LANGUAGES)
            for lang in EMBEDDED_LANGUAGES[1:]:
                want = translate(words, lex["lexicon"][lang], "same")
                assert row["text"][lang].split() == want, (row["id"], lang)


def test_measured_overlap_matches_the_spec(default_assets):
    a = default_assets
    spec = EmbeddedSpec()
    lex = json.loads(a.lexicon_file.read_text())
    rows = read_jsonl(a.test_file)
    invented: dict[str, set[str]] = {}
    for lang, p in zip(EMBEDDED_LANGUAGES[1:], spec.overlap, strict=True):
        table = lex["lexicon"][lang]
        # type level: exactly round(p * n) per group
        for group, words in lex["groups"].items():
            shared = sum(table[w] == w for w in words)
            assert shared == round(p * len(words)), (lang, group)
        # token level on the test file: close to p
        same = total = 0
        for row in rows:
            en, other = row["text"]["en"].split(), row["text"][lang].split()
            same += sum(x == y for x, y in zip(en, other, strict=True))
            total += len(en)
        assert abs(same / total - p) < 0.05, (lang, same / total, p)
        invented[lang] = {v for k, v in table.items() if v != k}
    # invented words are language-specific: no two languages share one
    langs = list(invented)
    for i, x in enumerate(langs):
        for y in langs[i + 1 :]:
            assert not invented[x] & invented[y]


def test_labels_are_balanced_and_follow_the_keyword_majority(default_assets):
    a = default_assets
    kw_class = {w: i for i, name in enumerate(EMBEDDED_LABELS) for w in KEYWORDS[name]}
    for path in (a.train_file, a.dev_file, a.test_file):
        rows = read_jsonl(path)
        n = len(rows)
        counts = Counter(row["label"] for row in rows)
        assert sorted(counts) == [0, 1, 2]
        for c in range(3):
            assert abs(counts[c] - n / 3) <= 0.04 * n, (path.name, counts)
        agree = 0
        for row in rows:
            votes = Counter(kw_class[w] for w in row["text"]["en"].split() if w in kw_class)
            (top, k1), *rest = votes.most_common()
            assert 3 <= sum(votes.values()) <= 6
            assert not rest or rest[0][1] < k1  # a strict majority class always exists
            agree += top == row["label"]
        # only the 3% annotation noise disagrees with the keyword majority
        assert 0.94 <= agree / n <= 0.995, (path.name, agree / n)


def test_tokenizer_covers_every_word(default_assets):
    from transformers import AutoTokenizer

    a = default_assets
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rows = read_jsonl(a.test_file)[:200] + read_jsonl(a.unlabeled_file)[:100]
    for row in rows:
        for text in row["text"].values():
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids
            assert len(ids) == len(text.split()) + 2  # <s> ... </s>: one token per word
    assert len(tok) < 1000


def test_build_is_deterministic(tmp_path):
    a = build_embedded(tmp_path / "one", spec=SMALL)
    b = build_embedded(tmp_path / "two", spec=SMALL)
    assert a.root.name == b.root.name
    for name in DATA_FILES:
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (a.model_dir / name).read_bytes() == (b.model_dir / name).read_bytes(), name
    # reuse: a second call on the same root returns the same folder without rebuilding
    mtime = (a.root / "train.jsonl").stat().st_mtime_ns
    again = build_embedded(tmp_path / "one", spec=SMALL)
    assert again.root == a.root
    assert (a.root / "train.jsonl").stat().st_mtime_ns == mtime


def test_spec_and_family_change_the_folder(tmp_path):
    other = EmbeddedSpec(**{**SMALL.__dict__, "seed": 1})
    names = {
        spec_hash(SMALL, "xlmr"),
        spec_hash(SMALL, "mt5"),
        spec_hash(other, "xlmr"),
    }
    assert len(names) == 3
    a = build_embedded(tmp_path, spec=SMALL)
    b = build_embedded(tmp_path, spec=other)
    assert a.train_file.read_bytes() != b.train_file.read_bytes()


def test_mt5_label_words_are_single_tokens(tmp_path):
    from transformers import AutoTokenizer

    a = build_embedded(tmp_path, "mt5", spec=SMALL)
    assert a.root.name.startswith("embedded-mt5-")
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    for word in a.label_words:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id


_BUILD = """
import sys
from alsace_ds.data.embedded import EmbeddedSpec, build_embedded
spec = EmbeddedSpec(n_train=60, n_unlabeled=30, n_dev=15, n_test=45, hidden=16, ffn=32)
print(build_embedded(sys.argv[1], spec=spec).root)
"""


@pytest.mark.launch
def test_concurrent_builds_share_one_folder(tmp_path):
    root = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD, str(root)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    roots = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(roots) == 1
    assert [p.name for p in root.iterdir()] == [Path(roots.pop()).name]  # no temp dirs left
    ref = build_embedded(tmp_path / "alone", spec=SMALL)
    built = next(root.iterdir())
    for name in DATA_FILES:
        assert (built / name).read_bytes() == (ref.root / name).read_bytes()
    langs = list(EMBEDDED_LANGUAGES)
    test = load_parallel_jsonl(built / "test.jsonl", langs, EMBEDDED_LABELS, require_label=True)
    assert len(test) == 45


def test_losing_the_rename_race_reuses_the_winner(tmp_path, monkeypatch):
    import alsace_ds.data.embedded as embedded

    winner = build_embedded(tmp_path / "winner", spec=SMALL)
    root = tmp_path / "root"
    target = root / winner.root.name
    real_write = embedded._write_data

    def write_then_lose(out, spec):
        vocab = real_write(out, spec)
        shutil.copytree(winner.root, target)  # another rank finishes first
        (target / "marker").write_text("winner")
        return vocab

    monkeypatch.setattr(embedded, "_write_data", write_then_lose)
    got = build_embedded(root, spec=SMALL)
    assert got.root == target
    assert (target / "marker").read_text() == "winner"  # the winner's copy was kept
    assert [p.name for p in root.iterdir()] == [target.name]  # our temp dir was removed


def test_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        build_embedded(tmp_path, spec=EmbeddedSpec(overlap=(0.5,)))
    with pytest.raises(ValueError, match="word_order"):
        build_embedded(tmp_path, spec=EmbeddedSpec(word_order=("sideways",) * 6))
    with pytest.raises(ValueError, match="family"):
        build_embedded(tmp_path, "bert")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_word_order_option():
    words = ["a", "b", "c", "d", "e"]
    table = {w: w.upper() for w in words}
    assert translate(words, table, "same") == ["A", "B", "C", "D", "E"]
    assert translate(words, table, "reverse") == ["E", "D", "C", "B", "A"]
    assert translate(words, table, "swap") == ["B", "A", "D", "C", "E"]


def test_recommended_hyperparameters_are_complete():
    for family in ("xlmr", "mt5"):
        for stage in ("stage0", "distill"):
            hp = RECOMMENDED[family][stage]
            assert hp["lr"] > 0 and hp["epochs"] >= 1 and hp["batch"] >= 1
    assert RECOMMENDED["xlmr"]["distill"]["lr"] == 1e-4
    assert RECOMMENDED["xlmr"]["distill"]["detach_teacher"] is False
