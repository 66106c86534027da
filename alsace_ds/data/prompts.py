"""Cloze templates and verbalizers as data: one YAML file per task.

Heads that read label words (XLM-R ``cloze``, mT5 ``label_words``) see every view rendered
through its language's template, and score one verbalizer word per label at the mask
(METHOD.md, "How the model gives P(y | x)"). The packaged files are
``alsace_ds/data/templates/{xnli,pawsx,xcopa}.yaml``; a file of your own in the same format is
loaded with ``load_prompts(..., path=...)``.

File format
===========
::

    task: xnli                           # optional; must name the task it is loaded for
    labels: [entailment, neutral, contradiction]   # optional, documentation only
    languages:
      en:
        template: ["{premise}?", "{mask}, {hypothesis}"]
        verbalizer: ["Yes", "Maybe", "No"]
      fr:
        ...

Per language:

``template`` (required)
    A string, or a 2-element list rendered as a sentence pair ``(segment_a, segment_b)``. A
    pair lets the mask sit at the start of segment b, where right truncation of the longer
    segment (``encode_views``: ``longest_first``) never removes it.
``verbalizer`` (required)
    One word per label, in label order. The model reads the vocabulary logit of each word's
    first token at the mask (``alsace_ds.models.scorers.label_word_token_ids`` checks every word
    against the tokenizer when the model is loaded). Quote the words: YAML reads unquoted
    ``Yes`` / ``No`` / ``On`` / ``Off`` as booleans.
``question`` (xcopa)
    A mapping from the view's ``question`` field value (``cause`` / ``effect``, the English
    dataset values) to this language's phrase, substituted for ``{question}``.
``classification`` (xcopa)
    A template (string or pair, no ``{mask}``) for the sequence-classification head, which has
    no verbalizer: it turns the 4-field view into one sentence pair. Tasks whose views are
    already a single text or a pair go to the classification head unrendered.

Placeholders: the task's view fields (:data:`FIELDS`), ``{mask}`` (the caller's mask string:
the tokenizer's mask token for XLM-R, the sentinel ``<extra_id_0>`` for mT5) and, for xcopa,
``{question}`` (the language's phrase for the view's cause/effect value). ``{{`` and ``}}``
are literal braces. Substituted values are inserted verbatim (never re-parsed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from alsace_ds.data.corpus import ParallelCorpus, ParallelExample

Template = str | list[str]

# The fields of each task's views, in view order. A view is a str when there is one field and
# a tuple otherwise. "jsonl" (your own files) has single texts or pairs.
FIELDS: dict[str, tuple[str, ...] | dict[str, tuple[str, ...]]] = {
    "xnli": ("premise", "hypothesis"),
    "pawsx": ("sentence1", "sentence2"),
    "xcopa": ("premise", "question", "choice1", "choice2"),
    "jsonl": {"single": ("text",), "pair": ("text_a", "text_b")},
}

# The values a view's ``question`` field takes; each needs a phrase in every language.
QUESTION_VALUES: dict[str, tuple[str, ...]] = {"xcopa": ("cause", "effect")}

PACKAGED_TASKS = ("xnli", "pawsx", "xcopa")
FORMS = ("cloze", "classification")
MASK = "mask"
QUESTION = "question"

_KEYS = ("template", "verbalizer", "question", "classification")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass
class Prompt:
    """One language's prompt of a task (see the module docstring for each field)."""

    template: Template
    verbalizer: list[str]
    question: dict[str, str] | None = None
    classification: Template | None = None


class _BadTemplate(ValueError):
    pass


def _parse(text: str) -> list[str | tuple[str]]:
    """Literal strings and ``(name,)`` placeholders; ValueError on an unbalanced brace."""
    parts: list[str | tuple[str]] = []
    pos = 0
    for m in _TOKEN.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        tok = m.group(0)
        if tok in ("{{", "}}"):
            parts.append(tok[0])
        elif m.group(1) is not None:
            parts.append((m.group(1).strip(),))
        else:
            raise _BadTemplate(
                f"unbalanced {tok!r} at position {m.start()} in {text!r} (write {tok * 2!r} "
                "for a literal brace)"
            )
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def _segments(template: Template) -> list[str]:
    return [template] if isinstance(template, str) else list(template)


def _placeholders(template: Template) -> list[str]:
    """Every placeholder name of the template, in order, with repeats."""
    return [p[0] for seg in _segments(template) for p in _parse(seg) if isinstance(p, tuple)]


def fields_for(task: str, *, pair: bool) -> tuple[str, ...]:
    """The view fields of ``task`` (jsonl: single texts or pairs, by ``pair``)."""
    if task not in FIELDS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(FIELDS)}")
    got = FIELDS[task]
    if isinstance(got, dict):
        return got["pair" if pair else "single"]
    return got


# ----------------------------------------------------------------------------- loading


def packaged_path(task: str) -> Path:
    """The packaged YAML of ``task`` (``alsace_ds/data/templates/<task>.yaml``)."""
    if task not in PACKAGED_TASKS:
        raise ValueError(
            f"no packaged prompts for task {task!r} (packaged: {list(PACKAGED_TASKS)}); pass "
            "path= to a YAML file in the format of alsace_ds/data/templates/xnli.yaml"
        )
    return Path(str(resources.files("alsace_ds.data") / "templates" / f"{task}.yaml"))


def _bool_hint(value: object) -> str:
    if isinstance(value, bool):
        return " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the word)"
    return ""


def _template(value: object, where: str, problems: list[str]) -> Template | None:
    if isinstance(value, str):
        if not value.strip():
            problems.append(f"{where} is empty")
            return None
        return value
    if isinstance(value, list):
        if len(value) != 2:
            problems.append(
                f"{where} is a list of {len(value)} element(s); a pair template is "
                '["segment a", "segment b"]'
            )
            return None
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            problems.append(f"{where} has empty or non-string segment(s) {bad!r}")
            return None
        return [value[0], value[1]]
    problems.append(f"{where} is {type(value).__name__}, expected a string or a 2-element list")
    return None


def _prompt(entry: object, where: str, problems: list[str]) -> Prompt | None:
    if not isinstance(entry, Mapping):
        problems.append(f"{where} is {type(entry).__name__}, expected a mapping with {_KEYS}")
        return None
    n_before = len(problems)
    unknown = sorted(str(k) for k in entry if k not in _KEYS)
    if unknown:
        problems.append(f"{where} has unknown key(s) {unknown} (expected {list(_KEYS)})")
    for key in ("template", "verbalizer"):
        if key not in entry:
            problems.append(f"{where} has no {key!r}")
    template = None
    if "template" in entry:
        template = _template(entry["template"], f"{where}.template", problems)
    verbalizer: list[str] = []
    if "verbalizer" in entry:
        words = entry["verbalizer"]
        if not isinstance(words, list) or not words:
            problems.append(f"{where}.verbalizer must be a non-empty list of words, got {words!r}")
        else:
            for j, w in enumerate(words):
                if not isinstance(w, str) or not w.strip():
                    problems.append(
                        f"{where}.verbalizer[{j}] = {w!r} is not a non-empty string{_bool_hint(w)}"
                    )
            verbalizer = [str(w) for w in words]
    question = entry.get("question")
    if question is not None:
        if not isinstance(question, Mapping) or not question:
            problems.append(f"{where}.question must be a mapping value -> phrase, got {question!r}")
            question = None
        else:
            for k, v in question.items():
                if not isinstance(k, str) or not isinstance(v, str) or not v.strip():
                    problems.append(
                        f"{where}.question: {k!r}: {v!r} must map a string to a non-empty "
                        f"phrase{_bool_hint(k)}{_bool_hint(v)}"
                    )
            question = {str(k): str(v) for k, v in question.items()}
    classification = entry.get("classification")
    if classification is not None:
        classification = _template(classification, f"{where}.classification", problems)
    if len(problems) > n_before or template is None:
        return None
    return Prompt(template, verbalizer, question, classification)


def load_prompts(
    task: str, languages: Sequence[str], *, path: str | Path | None = None
) -> dict[str, Prompt]:
    """The prompts of ``languages`` (in that order) for ``task``.

    ``path`` overrides the packaged file (``alsace_ds/data/templates/<task>.yaml``). The file's
    structure is validated (every language entry, not only the requested ones); a requested
    language that the file lacks is an error. Placeholders, mask and verbalizer length are
    :func:`check_prompts`' job (they depend on the head and the label count).

    Raises:
        ValueError: naming the task, the file and each problem's language and key.
    """
    if isinstance(languages, str):
        raise ValueError(f"languages must be a list of codes, not the string {languages!r}")
    file = packaged_path(task) if path is None else Path(path)
    head = f"prompts for task {task!r} ({file})"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{head}: cannot read the file ({exc})") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{head}: not valid YAML ({exc})") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("languages"), Mapping):
        raise ValueError(
            f"{head}: expected a mapping with a 'languages' mapping (language -> prompt)"
        )
    unknown = sorted(str(k) for k in doc if k not in ("task", "labels", "languages"))
    problems: list[str] = []
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown} (expected task, labels, languages)")
    if doc.get("task") is not None and doc["task"] != task:
        problems.append(f"the file is for task {doc['task']!r}, not {task!r}")
    prompts: dict[str, Prompt] = {}
    for lang, entry in doc["languages"].items():
        if not isinstance(lang, str):
            problems.append(f"language key {lang!r} is not a string{_bool_hint(lang)}")
            continue
        got = _prompt(entry, f"language {lang!r}", problems)
        if got is not None:
            prompts[lang] = got
    missing = [x for x in languages if x not in doc["languages"]]
    if missing:
        have = [str(k) for k in doc["languages"]]
        problems.append(f"no prompt for language(s) {missing} (the file has {have})")
    if problems:
        raise ValueError(_report(head, problems))
    return {lang: prompts[lang] for lang in languages}


def _report(head: str, problems: list[str]) -> str:
    n = len(problems)
    return f"{head}: {n} problem{'s' if n != 1 else ''}:\n" + "\n".join(
        f"  - {p}" for p in problems
    )


# ----------------------------------------------------------------------------- checking


def _check_template(
    template: Template,
    where: str,
    allowed: set[str],
    fields: tuple[str, ...] | None,
    problems: list[str],
) -> list[str]:
    """Placeholder checks shared by both forms; returns the placeholder names (or [])."""
    try:
        names = _placeholders(template)
    except _BadTemplate as exc:
        problems.append(f"{where}: {exc}")
        return []
    unknown = sorted({n for n in names if n not in allowed})
    if unknown:
        problems.append(
            f"{where} has unknown placeholder(s) {['{' + n + '}' for n in unknown]} "
            f"(allowed: {['{' + n + '}' for n in sorted(allowed)]})"
        )
    if fields is not None:
        unused = [f for f in fields if f not in names]
        if unused:
            problems.append(
                f"{where} does not use the field(s) {['{' + f + '}' for f in unused]}: their "
                "text would never reach the model"
            )
    return names


def check_prompts(
    task: str,
    prompts: Mapping[str, Prompt],
    num_labels: int,
    *,
    need_mask: bool,
    languages: Sequence[str] | None = None,
    fields: Sequence[str] | None = None,
) -> None:
    """Check the prompts against the task and the head; ValueError listing every problem.

    ``need_mask``: True for heads that read the cloze template and the verbalizer (XLM-R
    ``cloze``, mT5 ``label_words``): the template must hold ``{mask}`` exactly once and the
    verbalizer must have ``num_labels`` distinct words. False for the classification head: a
    task whose views have more than two fields (xcopa) needs a ``classification`` template,
    which must not hold ``{mask}``.

    Every problem names the task and the language: a language of ``languages`` without a
    prompt, an unknown placeholder (allowed: the task's fields, ``{mask}``, ``{question}``
    when the task has that field), a template that drops one of the view's fields, a missing
    ``question`` phrase for a value the task's views take. ``fields`` defaults to the task's
    (:data:`FIELDS`); for ``jsonl`` without ``fields`` either single texts or pairs pass.
    """
    head = f"prompts for task {task!r}"
    if fields is not None:
        field_sets: list[tuple[str, ...]] = [tuple(fields)]
    elif task in FIELDS:
        got = FIELDS[task]
        field_sets = list(got.values()) if isinstance(got, dict) else [got]
    else:
        raise ValueError(f"{head}: unknown task; pass fields= (the names of the view's fields)")
    # With several possible field sets (jsonl), a template must fit one of them.
    exact = field_sets[0] if len(field_sets) == 1 else None
    allowed = {f for fs in field_sets for f in fs} | {MASK}
    problems: list[str] = []
    for lang in languages or ():
        if lang not in prompts:
            problems.append(f"language {lang!r}: no prompt")
    for lang, prompt in prompts.items():
        where = f"language {lang!r}"
        names = _check_template(prompt.template, f"{where}: template", allowed, exact, problems)
        used = list(names)
        if need_mask:
            count = names.count(MASK)
            if count != 1:
                problems.append(
                    f"{where}: template {prompt.template!r} "
                    + ("has no {mask}" if count == 0 else f"has {{mask}} {count} times")
                    + "; the head reads the label words at exactly one mask"
                )
            words = prompt.verbalizer
            if len(words) != num_labels:
                problems.append(
                    f"{where}: verbalizer has {len(words)} word(s) {words} for {num_labels} labels"
                )
            dups = sorted({w for w in words if words.count(w) > 1})
            if dups:
                problems.append(f"{where}: verbalizer repeats {dups}; those labels would tie")
        else:
            if prompt.classification is None:
                if max(len(fs) for fs in field_sets) > 2:
                    problems.append(
                        f"{where}: no classification template; the classification head needs "
                        f"one to turn the {len(field_sets[0])} fields into a sentence pair"
                    )
            else:
                cls_names = _check_template(
                    prompt.classification, f"{where}: classification", allowed, exact, problems
                )
                used += cls_names
                if MASK in cls_names:
                    problems.append(
                        f"{where}: classification template {prompt.classification!r} holds "
                        "{mask}; the classification head reads no mask"
                    )
        if QUESTION in used:
            values = QUESTION_VALUES.get(task, ())
            if not prompt.question:
                problems.append(f"{where}: the template uses {{question}} but there is no question")
            else:
                lacking = [v for v in values if v not in prompt.question]
                if lacking:
                    problems.append(f"{where}: question has no phrase for {lacking}")
    if problems:
        raise ValueError(_report(head, problems))


# ----------------------------------------------------------------------------- rendering


def _fill(template: str, values: Mapping[str, str]) -> str:
    out = []
    for part in _parse(template):
        if isinstance(part, tuple):
            name = part[0]
            if name not in values:
                raise ValueError(f"unknown placeholder {{{name}}} in {template!r}")
            out.append(values[name])
        else:
            out.append(part)
    return "".join(out)


def render_view(
    view: str | Sequence[str],
    prompt: Prompt,
    fields: Sequence[str],
    mask_token: str,
    *,
    form: str = "cloze",
) -> str | tuple[str, str]:
    """Render one view through its language's prompt.

    ``view``: a str (one field) or a tuple of ``len(fields)`` strings, in ``fields`` order.
    ``form``: ``"cloze"`` (``prompt.template``) or ``"classification"``
    (``prompt.classification``; without one, a single text or a pair is returned as it is).
    A pair template gives a ``(segment_a, segment_b)`` tuple, a string template a str.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    fields = tuple(fields)
    parts = (view,) if isinstance(view, str) else tuple(view)
    if len(parts) != len(fields) or not all(isinstance(p, str) for p in parts):
        raise ValueError(
            f"a view with fields {fields} must have {len(fields)} strings, got {view!r}"
        )
    template = prompt.template if form == "cloze" else prompt.classification
    if template is None:
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            return (parts[0], parts[1])
        raise ValueError(
            f"the classification form of a {len(parts)}-field view needs a classification template"
        )
    values = dict(zip(fields, parts, strict=True))
    values[MASK] = mask_token
    if QUESTION in values and prompt.question is not None:
        key = values[QUESTION]
        if key not in prompt.question:
            raise ValueError(
                f"question value {key!r} has no phrase (the prompt has {sorted(prompt.question)})"
            )
        values[QUESTION] = prompt.question[key]
    segments = [_fill(seg, values) for seg in _segments(template)]
    return segments[0] if isinstance(template, str) else (segments[0], segments[1])


def render_corpus(
    corpus: ParallelCorpus,
    prompts: Mapping[str, Prompt],
    fields: Sequence[str],
    mask_token: str,
    *,
    form: str = "cloze",
) -> ParallelCorpus:
    """A new corpus with the same ids, labels and languages and every view rendered
    (:func:`render_view` with the prompt of the view's language)."""
    missing = [x for x in corpus.languages if x not in prompts]
    if missing:
        raise ValueError(f"{corpus.path}: no prompt for language(s) {missing}")
    examples = []
    for ex in corpus.examples:
        views = {}
        for lang in corpus.languages:
            try:
                views[lang] = render_view(
                    ex.views[lang], prompts[lang], fields, mask_token, form=form
                )
            except ValueError as exc:
                raise ValueError(f"{corpus.path} (id {ex.id!r}), language {lang!r}: {exc}") from exc
        examples.append(ParallelExample(id=ex.id, views=views, label=ex.label))
    return ParallelCorpus(
        path=corpus.path,
        languages=list(corpus.languages),
        label_names=list(corpus.label_names),
        examples=examples,
    )


__all__ = [
    "FIELDS",
    "PACKAGED_TASKS",
    "QUESTION_VALUES",
    "Prompt",
    "check_prompts",
    "fields_for",
    "load_prompts",
    "packaged_path",
    "render_corpus",
    "render_view",
]
