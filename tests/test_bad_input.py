"""Bad input stops the real entry point BEFORE training, with a message naming the file, the
row/field and the language, and leaves no run directory behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alsace_ds.train import main

LANGS = ["en", "fr", "de"]
LABELS = ["entailment", "neutral", "contradiction"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(i: int, label=0, **text) -> dict:
    views = {lang: f"sentence {i} in {lang}" for lang in LANGS}
    views.update(text)
    return {"id": f"ex-{i}", "label": label, "text": views}


@pytest.fixture
def files(tmp_path):
    good = [_row(i, label=i % 3) for i in range(1, 6)]
    return {
        "train": _write(tmp_path / "train.jsonl", [{"label": 1, "text": {"en": "hi there"}}]),
        "unlabeled": _write(tmp_path / "unlabeled.jsonl", good),
        "test": _write(tmp_path / "test.jsonl", good),
    }


def _run(tmp_path, files, capsys, extra=()):
    out = tmp_path / "run"
    args = [
        "task.name=jsonl",
        f"task.languages=[{','.join(LANGS)}]",
        f"task.labels=[{','.join(LABELS)}]",
        f"task.train_file={files['train']}",
        f"task.unlabeled_file={files['unlabeled']}",
        f"task.test_file={files['test']}",
        "model.name_or_path=xlm-roberta-large",  # never loaded: the input is rejected first
        f"run.output_dir={out}",
        *extra,
    ]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists(), "a rejected run must not leave a run directory"
    return err


def test_row_missing_a_language(tmp_path, files, capsys):
    rows = [_row(1), {"id": "ex-2", "label": 0, "text": {"en": "a", "fr": "b"}}]
    _write(files["unlabeled"], rows)
    err = _run(tmp_path, files, capsys)
    assert f"{files['unlabeled']}:2" in err and "ex-2" in err
    assert "text.de" in err and "'de'" in err


def test_empty_text(tmp_path, files, capsys):
    _write(files["test"], [_row(1), _row(2), _row(3, fr="   ")])
    err = _run(tmp_path, files, capsys)
    assert f"{files['test']}:3" in err and "text.fr" in err and "empty" in err


def test_label_outside_label_set(tmp_path, files, capsys):
    _write(files["test"], [_row(1), _row(2, label=7), _row(3, label="maybe")])
    err = _run(tmp_path, files, capsys)
    assert f"{files['test']}:2" in err and "7" in err
    assert f"{files['test']}:3" in err and "'maybe'" in err
    assert "2 problems" in err


def test_unknown_language_code(tmp_path, files, capsys):
    _write(files["unlabeled"], [_row(1, xx="hello")])
    err = _run(tmp_path, files, capsys)
    assert f"{files['unlabeled']}:1" in err and "'xx'" in err and "unknown language" in err


def test_unknown_config_key(tmp_path, files, capsys):
    err = _run(tmp_path, files, capsys, ["distill.learning_rate=1e-5", "stage0.epoch=3"])
    assert "distill.learning_rate: unknown key" in err and "stage0.epoch: unknown key" in err


def test_batch_size_that_does_not_divide(tmp_path, files, capsys):
    tpl = json.loads((Path(__file__).parent.parent / "ds_configs" / "zero2.json").read_text())
    tpl["train_batch_size"] = 10
    ds = tmp_path / "fixed.json"
    ds.write_text(json.dumps(tpl))
    err = _run(tmp_path, files, capsys, [f"deepspeed.config={ds}", "stage0.micro_batch=4"])
    assert str(ds) in err and "'train_batch_size' is 10 but our config says 4" in err


def test_missing_file(tmp_path, files, capsys):
    files["test"].unlink()
    err = _run(tmp_path, files, capsys)
    assert str(files["test"]) in err
