"""Paper-style tables (Table 2 / Table 3 layouts), split slices, overlap detection,
global batch resolution and preset names: pure functions against hand-computed values."""

from __future__ import annotations

import csv
import io

import pytest
import torch

from alsace_ds.config import ConfigError, config_path, load_config, preset_names, with_world
from alsace_ds.data.corpus import ParallelCorpus, ParallelExample
from alsace_ds.data.tasks import find_overlap, parse_split
from alsace_ds.method.metrics import summarize
from alsace_ds.reporting.tables import table2, table3, to_csv, to_markdown

LANGS = ["en", "fr", "sw"]


def _summ(correct, english="en", teachers=("en", "fr"), students=("sw",)):
    return summarize(
        LANGS,
        torch.tensor(correct, dtype=torch.float64),
        torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64),
        english,
        list(teachers),
        list(students),
    )


def test_table2_rows_and_gap_change():
    before, after = _summ([9, 7, 5]), _summ([9, 8, 7])
    rows = table2([("xlmr", before), ("ALSACE", after)], "en")
    assert rows[0] == ["model", "en", "fr", "sw", "avg"]
    assert rows[1] == ["xlmr", "90.00", "70.00", "50.00", "70.00"]
    # gaps 20 and 40 -> average 30; English shows "\" as in the paper
    assert rows[2] == ["Δ xlmr", "\\", "20.00", "40.00", "30.00"]
    assert rows[3] == ["ALSACE", "90.00", "80.00", "70.00", "80.00"]
    assert rows[4] == ["Δ ALSACE", "\\", "10.00", "20.00", "15.00 (-15.00)"]


def test_table3_groups():
    rows = table3([("base", _summ([9, 7, 5]))])
    assert rows[0] == ["method", "avg(S)", "Δ(S)", "avg(T)", "Δ(T)", "avg(A)", "Δ(A)", "Δ(A)/|T|"]
    # students: sw 50 (gap 40); teachers: en 90, fr 70 -> 80 (gap over fr only: 20);
    # all: gaps 20 + 40 over the 2 non-English languages = 30, over all 3 languages = 20
    assert rows[1] == ["base", "50.00", "40.00", "80.00", "20.00", "70.00", "30.00", "20.00"]


def test_no_english_reference_has_accuracies_only():
    s = _summ([9, 7, 5], english=None)
    assert s["gap"] == {"en": None, "fr": None, "sw": None}
    rows = table2([("m", s)], None)
    assert len(rows) == 2 and rows[1][-1] == "70.00"
    assert table3([("m", s)])[1][2] == "–"


def test_markdown_and_csv_carry_the_same_cells():
    rows = table3([("base", _summ([9, 7, 5]))])
    assert list(csv.reader(io.StringIO(to_csv(rows)))) == rows
    md = to_markdown(rows).splitlines()
    assert md[0] == "| " + " | ".join(rows[0]) + " |" and md[1].startswith("|---|---:")
    assert md[2] == "| " + " | ".join(rows[1]) + " |"


def test_parse_split():
    assert parse_split("test") == ("test", slice(None, None))
    assert parse_split("validation[:500]") == ("validation", slice(None, 500))
    assert parse_split("validation[-500:]") == ("validation", slice(-500, None))
    with pytest.raises(ConfigError, match="NAME\\[start:stop\\]"):
        parse_split("validation[:5")


def _corpus(rows):
    ex = [
        ParallelExample(str(i), dict(zip(["en", "fr"], r, strict=True)), 0)
        for i, r in enumerate(rows)
    ]
    return ParallelCorpus("mem", ["en", "fr"], ["a"], ex)


def test_find_overlap_by_view_text():
    a = _corpus([("x", "y"), ("p", "q"), ("m", "n2")])
    b = _corpus([("x", "zz"), ("k", "l"), ("m2", "n2")])
    # row 0 shares its English view, row 2 its French view; row 1 nothing
    assert find_overlap(a, b) == ["0", "2"]


def test_global_batch_resolves_grad_accum():
    cfg = load_config(None, ["stage0.micro_batch=4", "stage0.global_batch=32",
                             "distill.micro_batch=2", "distill.global_batch=8",
                             "distill.view_parallel_size=2"])  # fmt: skip
    two = with_world(cfg, 2)
    assert two.stage0.grad_accum == 4 and two.stage0.global_batch is None
    assert two.distill.grad_accum == 4  # 2 ranks form one view group: 1 data-parallel rank
    sixteen = with_world(cfg, 16)  # micro_batch is a cap: 2 examples per rank, no accumulation
    assert (sixteen.stage0.micro_batch, sixteen.stage0.grad_accum) == (2, 1)
    assert (sixteen.distill.micro_batch, sixteen.distill.grad_accum) == (1, 1)  # 8 view groups
    with pytest.raises(ConfigError, match="stage0.global_batch: 32 examples per step do not "
                       "split evenly over 64 ranks"):  # fmt: skip
        with_world(cfg, 64)
    with pytest.raises(ConfigError, match="set global_batch or grad_accum"):
        load_config(None, ["stage0.global_batch=32", "stage0.grad_accum=2"])


def test_presets_by_name():
    names = preset_names()
    for want in ("xnli-xlmr-large", "xnli-mt5-large", "xnli-xlmr-base", "pawsx-xlmr-large",
                 "xcopa-xlmr-large", "xnli-xlmr-large-k128", "pawsx-xlmr-large-k512"):  # fmt: skip
        assert want in names
    assert config_path("xnli-mt5-large").name == "xnli-mt5-large.yaml"
    with pytest.raises(ConfigError, match="no such preset"):
        config_path("xnli-bert-huge")
