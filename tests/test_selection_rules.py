"""The selection rules of paper Table 3 (``random``, ``scale``) and their config checks, against
hand-written expectations (pure Python, milliseconds)."""

from __future__ import annotations

import json

import pytest
import torch

from alsace_ds.config import ConfigError, load_config
from alsace_ds.data.pretraining import corpus_size_problems, load_sizes
from alsace_ds.data.tasks import selection_rule_problems
from alsace_ds.method.selection import Selection
from alsace_ds.recipes.strategies import (
    SELECTION_RULES,
    RuleInputs,
    apply_selection_rule,
    selection_rule,
)

XNLI = "en fr es de el bg ru tr ar vi th zh hi sw ur".split()


def vote(languages: list[str], teachers: list[str]) -> Selection:
    """A vote that picked ``teachers`` (only its teachers/students matter to the rules)."""
    T = len(languages)
    return Selection(
        languages=languages, pseudo_labels=torch.zeros(1, dtype=torch.long),
        confidence=torch.full((T,), 0.5, dtype=torch.float64),
        scores=torch.full((T,), 1.0 / T, dtype=torch.float64), threshold=1.0 / T,
        teachers=[x for x in languages if x in teachers],
        students=[x for x in languages if x not in teachers],
        agreement=torch.ones(T, dtype=torch.float64), num_examples=1,
    )  # fmt: skip


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


# ----------------------------------------------------------------------------- random


# random.Random(seed).sample(XNLI, 5) in task order, seeds 0-5: written out once, pinned, so
# that a change of the draw (another RNG, another sample call, a sort) fails here.
DRAWS_OF_5 = {
    0: ["en", "ru", "hi", "sw", "ur"],
    1: ["fr", "es", "el", "vi", "hi"],
    2: ["en", "fr", "zh", "sw", "ur"],
    3: ["es", "de", "bg", "ar", "vi"],
    4: ["fr", "de", "el", "ru", "zh"],
    5: ["el", "bg", "vi", "th", "zh"],
}


def test_random_is_a_seeded_sample_of_the_votes_count_in_task_order():
    sel = vote(XNLI, ["en", "fr", "de", "es", "ru"])  # the vote picked 5
    rule = SELECTION_RULES["random"]
    cfg = cfg_with().selection
    for seed, drawn in DRAWS_OF_5.items():
        teachers, students = rule(sel, XNLI, RuleInputs(cfg, seed))
        assert teachers == drawn, seed  # the vote's count, in task order
        assert students == [x for x in XNLI if x not in drawn], seed
        assert rule(sel, XNLI, RuleInputs(cfg, seed)) == (teachers, students)  # reproducible


def test_random_through_the_config_records_rule_and_seed():
    cfg = cfg_with("selection.rule=random", "run.seed=3", f"task.languages=[{','.join(XNLI)}]",
                   "task.name=jsonl", "task.train_file=a", "task.unlabeled_file=b",
                   "task.test_file=c", "model.name_or_path=m", "task.labels=[a,b]")  # fmt: skip
    teachers, students, record = apply_selection_rule(vote(XNLI, ["en", "fr"]), XNLI, cfg)
    assert record == {"rule": "random", "seed": 3}
    assert teachers == ["de", "vi"]  # random.Random(3).sample(XNLI, 2), task order
    assert students == [x for x in XNLI if x not in ("de", "vi")]


def test_no_teacher_in_the_vote_is_an_error_for_the_derived_rules_too():
    sel = vote(["en", "fr"], [])
    for name in ("random", "scale"):
        inputs = RuleInputs(cfg_with().selection, 0, {"en": 2.0, "fr": 1.0}, "x")
        with pytest.raises(RuntimeError, match="no language reached selection.threshold"):
            SELECTION_RULES[name](sel, ["en", "fr"], inputs)


# ----------------------------------------------------------------------------- scale


def test_scale_takes_the_top_k_of_cc100_and_mc4_on_xnli():
    sel = vote(XNLI, ["en", "fr", "es", "de", "el", "bg", "ru"])  # k = 7, as in the paper
    cfg = cfg_with().selection
    expected = {
        # CC-100 tokens (M): en 55608, vi 24757, ru 23408, de 10297, fr 9780, es 9374, bg 5487
        "cc100": ["en", "fr", "es", "de", "bg", "ru", "vi"],
        # mC4 tokens (B): en 2733, ru 713, es 433, de 347, fr 318, vi 116, tr 71
        "mc4": ["en", "fr", "es", "de", "ru", "tr", "vi"],
    }
    for table, teachers in expected.items():
        _, sizes = load_sizes(table, "xlmr", "jsonl")
        got = SELECTION_RULES["scale"](sel, XNLI, RuleInputs(cfg, 0, sizes, table))
        assert got == (teachers, [x for x in XNLI if x not in teachers]), table


def test_scale_ties_go_to_the_earlier_task_language():
    langs = ["d", "c", "b", "a"]
    sizes = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 1.0}
    rule, cfg = SELECTION_RULES["scale"], cfg_with().selection
    assert rule(vote(langs, ["a"]), langs, RuleInputs(cfg, 0, sizes)) == (["c"], ["d", "b", "a"])
    got = rule(vote(langs, ["a", "b", "c"]), langs, RuleInputs(cfg, 0, sizes))
    assert got == (["d", "c", "b"], ["a"])  # the 1.0 tie at the cut: d comes before a


def test_auto_picks_the_table_by_family_and_the_embedded_one_for_the_embedded_task():
    assert load_sizes("auto", "xlmr", "jsonl")[0] == "cc100"
    assert load_sizes("auto", "mt5", "xnli")[0] == "mc4"
    name, sizes = load_sizes("auto", "mt5", "embedded")
    assert name == "embedded"
    assert sizes == {"en": 1.0, "qaa": 0.95, "qab": 0.9, "qac": 0.85, "qad": 0.5, "qae": 0.4,
                     "qaf": 0.3}  # fmt: skip
    cfg = cfg_with("selection.rule=scale")  # the embedded default task
    langs = list(sizes)
    sel = vote(langs, ["en", "qaa", "qab"])
    teachers, students, record = apply_selection_rule(sel, langs, cfg)
    assert (teachers, students) == (["en", "qaa", "qab"], ["qac", "qad", "qae", "qaf"])
    assert record == {"rule": "scale", "corpus_sizes": {"table": "embedded", "unit": "synthetic",
                                                        "sizes": sizes}}  # fmt: skip


def test_a_task_language_missing_from_the_table_is_named_before_training():
    xcopa = "en et ht id it qu sw ta th tr vi zh".split()  # XCOPA's, with an English view
    base = [
        "task.name=jsonl",
        "task.train_file=a",
        "task.unlabeled_file=b",
        "task.test_file=c",
        "model.name_or_path=m",
        "task.labels=[a,b]",
        f"task.languages=[{','.join(xcopa)}]",
    ]
    cfg = cfg_with(*base, "selection.rule=scale")
    assert selection_rule_problems(cfg) == [
        "selection.corpus_sizes: the table 'cc100' (chosen by selection.corpus_sizes='auto') has "
        "no size for the task language(s) ht, qu; give a JSON file {language: size} that covers "
        "every task language"
    ]
    assert corpus_size_problems("mc4", "xlmr", "jsonl", xcopa) == [
        "selection.corpus_sizes: the table 'mc4' (chosen by selection.corpus_sizes='mc4') has no "
        "size for the task language(s) qu; give a JSON file {language: size} that covers every "
        "task language"
    ]
    assert selection_rule_problems(cfg_with(*base)) == []  # threshold: no table needed


def test_a_sizes_file_is_used_and_recorded(tmp_path):
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps({"en": 3, "fr": 10, "de": 1}))
    cfg = cfg_with("task.name=jsonl", "task.train_file=a", "task.unlabeled_file=b",
                   "task.test_file=c", "model.name_or_path=m", "task.labels=[a,b]",
                   "task.languages=[en,fr,de]", "selection.rule=scale",
                   f"selection.corpus_sizes={path}")  # fmt: skip
    assert selection_rule_problems(cfg) == []
    teachers, students, record = apply_selection_rule(vote(["en", "fr", "de"], ["en", "de"]),
                                                      ["en", "fr", "de"], cfg)  # fmt: skip
    assert (teachers, students) == (["en", "fr"], ["de"])
    assert record["corpus_sizes"] == {"table": str(path), "unit": "as in the file",
                                      "sizes": {"en": 3.0, "fr": 10.0, "de": 1.0}}  # fmt: skip


# ----------------------------------------------------------------------------- config


def test_rule_follows_teachers():
    assert selection_rule(cfg_with().selection) == "threshold"
    assert selection_rule(cfg_with("selection.teachers=[all]").selection) == "fixed"
    assert selection_rule(cfg_with("selection.rule=scale").selection) == "scale"


@pytest.mark.parametrize(
    "overrides,problem",
    [
        (["selection.rule=vote"],
         "selection.rule: 'vote' is not one of ['threshold', 'fixed', 'random', 'scale']"),
        (["selection.rule=random", "selection.teachers=[all]"],
         "selection.teachers: ['all'] fixes the teachers, so selection.rule 'random' would be "
         "ignored; set one of them (selection.teachers means rule 'fixed')"),
        (["selection.rule=fixed"],
         "selection.rule: 'fixed' needs selection.teachers (a list of codes, or [all])"),
        (["selection.corpus_sizes=cc99"],
         "selection.corpus_sizes: 'cc99' is no table name (auto, cc100, mc4, embedded) and no "
         "such file"),
    ],
)  # fmt: skip
def test_bad_rule_settings_are_config_errors(overrides, problem):
    with pytest.raises(ConfigError) as ei:
        cfg_with(*overrides)
    assert ei.value.problems == [problem]


@pytest.mark.parametrize(
    "text,why",
    [
        ("{not json", "cannot read {p!r} as JSON (Expecting property name enclosed in double "
                      "quotes: line 1 column 2 (char 1))"),
        ("[1, 2]", '{p!r} must hold a non-empty JSON object {{"language code": size, ...}}'),
        ('{"en": 0, "fr": "big", "de": 2}', "{p!r}: the size of 'en', 'fr' is not a positive "
                                            "number"),
    ],
)  # fmt: skip
def test_a_bad_sizes_file_is_a_config_error(tmp_path, text, why):
    p = tmp_path / "sizes.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        cfg_with("selection.rule=scale", f"selection.corpus_sizes={p}")
    assert ei.value.problems == ["selection.corpus_sizes: " + why.format(p=str(p))]


# End to end (the rule through the real entry point, selection.json's rule, seed and teachers):
# test_experiment.py, on the experiment driver's random_selection run.
