"""Templates and verbalizers as data (alsace_ds.data.prompts, alsace_ds/data/templates/*.yaml)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from alsace_ds.data.corpus import ParallelCorpus, ParallelExample
from alsace_ds.data.prompts import (
    FIELDS,
    PACKAGED_TASKS,
    Prompt,
    check_prompts,
    fields_for,
    load_prompts,
    packaged_path,
    render_corpus,
    render_view,
)
from alsace_ds.data.tokens import encode_views
from alsace_ds.models.tiny import build_word_tokenizer

LANGUAGES = {
    "xnli": "en fr es de el bg ru tr ar vi th zh hi sw ur".split(),
    "pawsx": "en de es fr ja ko zh".split(),
    "xcopa": "et ht id it qu sw ta th tr vi zh en".split(),
}
NUM_LABELS = {"xnli": 3, "pawsx": 2, "xcopa": 2}
XCOPA_VIEW = ("The man fell.", "cause", "He slipped.", "He ran.")


def _write(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize("task", PACKAGED_TASKS)
def test_packaged_files_load_and_check(task):
    path = packaged_path(task)
    assert path.is_file() and path.name == f"{task}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert doc["task"] == task
    assert sorted(doc["languages"]) == sorted(LANGUAGES[task])  # exactly the task's languages
    prompts = load_prompts(task, LANGUAGES[task])
    assert list(prompts) == LANGUAGES[task]
    check_prompts(task, prompts, NUM_LABELS[task], need_mask=True, languages=LANGUAGES[task])
    check_prompts(task, prompts, NUM_LABELS[task], need_mask=False)
    for lang, p in prompts.items():
        assert isinstance(p, Prompt)
        assert len(p.verbalizer) == NUM_LABELS[task], lang
        assert all(isinstance(w, str) and w.strip() == w for w in p.verbalizer), lang
        # The mask opens or closes segment b, out of reach of right truncation of segment a.
        assert isinstance(p.template, list) and "{mask}" in p.template[1], lang
        if task == "xcopa":
            assert set(p.question) == {"cause", "effect"} and p.classification is not None
        else:
            assert p.question is None and p.classification is None
        # Every view renders (the mask string of mT5 here).
        view = XCOPA_VIEW if task == "xcopa" else ("a b", "c d")
        got = render_view(view, p, FIELDS[task], "<extra_id_0>")
        assert isinstance(got, tuple) and sum(s.count("<extra_id_0>") for s in got) == 1


def test_render_xnli_pair_values():
    p = load_prompts("xnli", ["en", "es", "zh", "ar"])
    fields = FIELDS["xnli"]
    view = ("A man sleeps", "Someone rests.")
    assert render_view(view, p["en"], fields, "<mask>") == (
        "A man sleeps?",
        "<mask>, Someone rests.",
    )
    assert render_view(view, p["es"], fields, "<mask>") == (
        "¿A man sleeps?",
        "<mask>, Someone rests.",
    )
    assert render_view(("他睡了", "有人在休息。"), p["zh"], fields, "<extra_id_0>") == (
        "他睡了？",
        "<extra_id_0>，有人在休息。",
    )
    assert render_view(("x", "y"), p["ar"], fields, "<mask>") == ("x؟", "<mask>، y")
    assert p["en"].verbalizer == ["Yes", "Maybe", "No"]
    assert load_prompts("pawsx", ["ja"])["ja"].verbalizer == ["いいえ", "はい"]
    # The classification head reads a pair view as it is.
    assert render_view(view, p["en"], fields, "<mask>", form="classification") == view


def test_render_single_template_and_escapes(tmp_path):
    path = _write(
        tmp_path,
        """
        languages:
          en:
            template: "{{{text}}} It was {mask}."
            verbalizer: ["bad", "good"]
        """,
    )
    p = load_prompts("jsonl", ["en"], path=path)
    fields = fields_for("jsonl", pair=False)
    assert fields == ("text",)
    check_prompts("jsonl", p, 2, need_mask=True, fields=fields)
    check_prompts("jsonl", p, 2, need_mask=True)  # jsonl without fields: single or pair
    # Values are inserted verbatim (braces in the text are not placeholders).
    assert (
        render_view("Great {movie}", p["en"], fields, "<mask>") == "{Great {movie}} It was <mask>."
    )
    assert render_view("x", p["en"], fields, "<mask>", form="classification") == "x"
    assert fields_for("jsonl", pair=True) == ("text_a", "text_b")
    assert fields_for("xnli", pair=True) == ("premise", "hypothesis")


def test_render_xcopa_question_by_cause_or_effect():
    p = load_prompts("xcopa", ["en", "it"])
    fields = FIELDS["xcopa"]
    assert render_view(XCOPA_VIEW, p["en"], fields, "<mask>") == (
        "The man fell. What was the cause? 1: He slipped. 2: He ran.",
        "Answer: <mask>",
    )
    effect = ("L'uomo cadde.", "effect", "Si fece male.", "Rise.")
    assert render_view(effect, p["it"], fields, "<mask>") == (
        "L'uomo cadde. Che cosa è successo di conseguenza? 1: Si fece male. 2: Rise.",
        "Risposta: <mask>",
    )
    assert render_view(effect, p["it"], fields, "<mask>", form="classification") == (
        "L'uomo cadde. Che cosa è successo di conseguenza?",
        "1: Si fece male. 2: Rise.",
    )
    with pytest.raises(ValueError, match="question value 'why' has no phrase"):
        render_view(("a", "why", "b", "c"), p["en"], fields, "<mask>")
    with pytest.raises(ValueError, match="must have 4 strings"):
        render_view(("a", "cause", "b"), p["en"], fields, "<mask>")
    no_cls = Prompt(p["en"].template, ["1", "2"], p["en"].question, None)
    with pytest.raises(ValueError, match="needs a classification template"):
        render_view(XCOPA_VIEW, no_cls, fields, "<mask>", form="classification")
    with pytest.raises(ValueError, match="form must be"):
        render_view(XCOPA_VIEW, p["en"], fields, "<mask>", form="plain")


def test_render_corpus_keeps_ids_labels_languages():
    corpus = ParallelCorpus(
        path="mem.jsonl",
        languages=["en", "de"],
        label_names=["not_paraphrase", "paraphrase"],
        examples=[
            ParallelExample("a", {"en": ("s1", "s2"), "de": ("t1", "t2")}, 1),
            ParallelExample("b", {"en": ("u1", "u2"), "de": ("v1", "v2")}, 0),
        ],
    )
    prompts = load_prompts("pawsx", ["en", "de"])
    out = render_corpus(corpus, prompts, FIELDS["pawsx"], "<mask>")
    assert out is not corpus and out.ids == ["a", "b"] and out.labels().tolist() == [1, 0]
    assert out.languages == ["en", "de"] and out.label_names == corpus.label_names
    assert out.is_pair
    assert out.texts("de") == [("t1?", "<mask>, t2"), ("v1?", "<mask>, v2")]
    assert corpus.texts("en") == [("s1", "s2"), ("u1", "u2")]  # the input is untouched
    with pytest.raises(ValueError, match=r"mem.jsonl: no prompt for language\(s\) \['de'\]"):
        render_corpus(corpus, {"en": prompts["en"]}, FIELDS["pawsx"], "<mask>")
    bad = ParallelCorpus("mem.jsonl", ["en"], ["x", "y"], [ParallelExample("z", {"en": "one"})])
    with pytest.raises(ValueError, match="mem.jsonl .id 'z'., language 'en': a view with fields"):
        render_corpus(bad, prompts, FIELDS["pawsx"], "<mask>")


def test_mask_survives_truncation():
    """The mask opens segment b: longest_first truncation trims the long premise instead."""
    p = load_prompts("xnli", ["en"])["en"]
    premise = " ".join(["the cat sat on the mat"] * 6)
    view = render_view((premise, "a dog ran"), p, FIELDS["xnli"], "<mask>")
    tok = build_word_tokenizer(["the cat sat on the mat a dog ran ? ,"], "xlmr")
    ids = encode_views(tok, [view], 12)["input_ids"][0].tolist()
    assert len(ids) == 12 and ids.count(tok.mask_token_id) == 1


def test_errors_name_task_and_language(tmp_path):
    path = _write(
        tmp_path,
        """
        task: xnli
        languages:
          en:
            template: ["{premise}?", "{hypothesis}"]
            verbalizer: ["Yes", "Maybe", "No"]
          fr:
            template: ["{premise} ?", "{mask}, {hypothsis}"]
            verbalizer: ["Oui", "Non"]
          de:
            template: "{premise} {mask} {mask} {hypothesis}"
            verbalizer: ["Ja", "Ja", "Nein"]
        """,
    )
    with pytest.raises(
        ValueError, match=r"(?s)task 'xnli' .*- no prompt for language\(s\) \['es'\]"
    ):
        load_prompts("xnli", ["en", "es"], path=path)
    p = load_prompts("xnli", ["en", "fr", "de"], path=path)
    with pytest.raises(ValueError) as err:
        check_prompts("xnli", p, 3, need_mask=True, languages=["en", "fr", "de", "sw"])
    msg = str(err.value)
    assert msg.startswith("prompts for task 'xnli': ")
    assert "language 'sw': no prompt" in msg
    assert "language 'en': template ['{premise}?', '{hypothesis}'] has no {mask}" in msg
    assert "language 'fr': template has unknown placeholder(s) ['{hypothsis}']" in msg
    assert "language 'fr': template does not use the field(s) ['{hypothesis}']" in msg
    assert "language 'fr': verbalizer has 2 word(s) ['Oui', 'Non'] for 3 labels" in msg
    assert (
        "language 'de': template '{premise} {mask} {mask} {hypothesis}' has {mask} 2 times" in msg
    )
    assert "language 'de': verbalizer repeats ['Ja']" in msg
    # The classification head reads neither the mask nor the verbalizer.
    with pytest.raises(ValueError) as err:
        check_prompts("xnli", p, 3, need_mask=False)
    assert "has no {mask}" not in str(err.value) and "verbalizer" not in str(err.value)
    assert "language 'fr': template has unknown placeholder" in str(err.value)


def test_xcopa_errors(tmp_path):
    path = _write(
        tmp_path,
        """
        languages:
          et:
            template: ["{premise} {question} 1: {choice1} 2: {choice2}", "Vastus: {mask}"]
            verbalizer: ["1", "2"]
            question: {cause: "Mis oli selle põhjus?"}
          it:
            template: ["{premise} {question} 1: {choice1} 2: {choice2}", "{mask}"]
            verbalizer: ["1", "2"]
            classification: ["{premise} {mask}", "{choice1} {choice2}"]
        """,
    )
    p = load_prompts("xcopa", ["et", "it"], path=path)
    with pytest.raises(ValueError) as err:
        check_prompts("xcopa", p, 2, need_mask=True)
    msg = str(err.value)
    assert "language 'et': question has no phrase for ['effect']" in msg
    assert "language 'it': the template uses {question} but there is no question" in msg
    with pytest.raises(ValueError) as err:
        check_prompts("xcopa", p, 2, need_mask=False)
    msg = str(err.value)
    assert "language 'et': no classification template" in msg
    assert "language 'it': classification template ['{premise} {mask}', " in msg
    assert "language 'it': classification does not use the field(s) ['{question}']" in msg


def test_file_structure_errors(tmp_path):
    with pytest.raises(ValueError, match="no packaged prompts for task 'jsonl'.*path="):
        load_prompts("jsonl", ["en"])
    with pytest.raises(ValueError, match="cannot read"):
        load_prompts("xnli", ["en"], path=tmp_path / "missing.yaml")
    path = _write(
        tmp_path,
        """
        task: pawsx
        colour: blue
        languages:
          en:
            template: ["{sentence1}?", "{mask}, {sentence2}", "extra"]
            verbalizer: [No, Yes]
            typo: 1
          de:
            verbalizer: ["Nein", "Ja"]
          fr:
            template: "{sentence1} { ?"
            verbalizer: ["Non", "Oui"]
        """,
    )
    with pytest.raises(ValueError) as err:
        load_prompts("xnli", ["en"], path=path)
    msg = str(err.value)
    assert msg.startswith(f"prompts for task 'xnli' ({path}): ")
    assert "the file is for task 'pawsx', not 'xnli'" in msg
    assert "unknown top-level key(s) ['colour']" in msg
    assert "language 'en' has unknown key(s) ['typo']" in msg
    assert "language 'en'.template is a list of 3 element(s)" in msg
    assert "language 'en'.verbalizer[0] = False is not a non-empty string (YAML reads" in msg
    assert "language 'de' has no 'template'" in msg
    # An unbalanced brace surfaces in check_prompts, with its language.
    fr = _write(tmp_path, '{languages: {fr: {template: "{sentence1} { ?", verbalizer: [a, b]}}}')
    p = load_prompts("pawsx", ["fr"], path=fr)
    with pytest.raises(ValueError, match=r"language 'fr': template: unbalanced '\{' at position"):
        check_prompts("pawsx", p, 2, need_mask=True)
    with pytest.raises(ValueError, match="expected a mapping with a 'languages' mapping"):
        load_prompts("xnli", ["en"], path=_write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ValueError, match="unknown task; pass fields="):
        check_prompts("sst2", p, 2, need_mask=True)
