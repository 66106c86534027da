"""Parallel-corpus JSONL format, its loader and its validation.

Format
======
One example per line (JSON Lines, UTF-8; a byte-order mark and CRLF line ends are accepted).
Each line is a JSON object::

    {"id": "ex-17", "label": 2, "text": {"en": "The match ended late.", "fr": "Le match ..."}}
    {"id": "p-3", "label": "entailment",
     "text": {"en": ["A man sleeps.", "Someone rests."], "fr": ["Un homme dort.", "..."]}}

Fields
------
``text`` (required)
    An object mapping a language code to that language's *view* of the example. A view is a
    non-empty string (single-sentence tasks) or a 2-element list ``["premise", "hypothesis"]``
    of non-empty strings (sentence-pair tasks). Whitespace-only texts are rejected. All views
    of one file must be of the same kind (all strings or all pairs). Every configured language
    must be present in every row (the corpus is *parallel*: row i of every language is a
    translation of the same example). A key that is not a configured language is an error,
    unless the loader is called with ``extra_languages="ignore"``, which drops such keys (used
    for the English training file, which only needs ``en``).
``label`` (optional)
    The gold label: an integer index into the configured label set (``0 <= label < |Y|``) or
    the label's name (a string equal to one of the configured label names). ``null`` counts as
    absent. A file is either fully labeled or fully unlabeled; labels are required when the
    loader is called with ``require_label=True``. Labels of the unlabeled corpus are never
    used by teacher selection or distillation.
``id`` (optional)
    A non-empty string (or an integer, converted to its decimal string) unique within the
    file. Defaults to the 1-based line number as a string (``"17"``).

Any other top-level field is ignored. Blank lines are skipped (line numbers in messages are
physical 1-based line numbers of the file).

Validation
==========
:func:`load_parallel_jsonl` validates the whole file (or the first ``max_examples`` examples)
when it is loaded, i.e. before any training starts. Every problem names the file, the row (line
number and id), the field and the language or label, e.g.::

    data/unlabeled.jsonl:17 (id 'ex-17'): text.fr is missing (language 'fr' is configured but
    absent from this row)

Up to :data:`MAX_REPORTED` problems are collected and raised together as ONE :class:`DataError`
whose first line says how many problems were found in which file. Invalid *arguments* (empty or
duplicated languages / label names, a bad ``extra_languages`` or ``max_examples``) raise a plain
``ValueError`` immediately.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: One example in one language. A str (single-text tasks), a (text_a, text_b) pair (JSONL pair
#: files, XNLI, PAWS-X, and every view rendered through a prompt) or a tuple of the task's
#: fields in field order (XCOPA / COPA from the Hub: (premise, question, choice1, choice2),
#: which a prompt renders to a str or a pair before it is encoded).
View = str | tuple[str, ...]

MAX_REPORTED = 20
"""How many problems a :class:`DataError` lists (the total count is always reported)."""


class DataError(ValueError):
    """A data file failed validation; ``problems`` lists the (first 20) problems found."""

    def __init__(self, path: str, problems: Sequence[str], total: int | None = None):
        self.path = str(path)
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        n = self.total
        head = f"{n} problem{'s' if n != 1 else ''} in {self.path}"
        if n > len(self.problems):
            head += f" (showing the first {len(self.problems)})"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class ParallelExample:
    """One row: its id, one view per language and the label index (None if unlabeled)."""

    id: str
    views: dict[str, View]
    label: int | None = None


@dataclass
class ParallelCorpus:
    """A validated parallel corpus: every example has a view in every one of ``languages``."""

    path: str
    languages: list[str]
    label_names: list[str]
    examples: list[ParallelExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_pair(self) -> bool:
        """True when the views are (premise, hypothesis) pairs."""
        return bool(self.examples) and isinstance(self.examples[0].views[self.languages[0]], tuple)

    @property
    def ids(self) -> list[str]:
        return [ex.id for ex in self.examples]

    def texts(self, lang: str) -> list[View]:
        """The views of language ``lang``, in row order."""
        if lang not in self.languages:
            raise KeyError(f"language {lang!r} is not in this corpus (has {self.languages})")
        return [ex.views[lang] for ex in self.examples]

    def labels(self) -> torch.Tensor | None:
        """``[N]`` long tensor of label indices, or None when the corpus is unlabeled."""
        labels = [ex.label for ex in self.examples]
        if not labels or any(lab is None for lab in labels):
            return None
        return torch.tensor(labels, dtype=torch.long)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ParallelCorpus:
        """A new corpus with the examples at ``indices`` (in the given order)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        n = len(self.examples)
        picked = []
        for i in indices:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a corpus of {n} examples")
            picked.append(self.examples[i])
        return ParallelCorpus(
            path=self.path,
            languages=list(self.languages),
            label_names=list(self.label_names),
            examples=picked,
        )


def _check_names(what: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ValueError(f"{what} must be a list of strings, not the string {names!r}")
    names = list(names)
    if not names:
        raise ValueError(f"{what} must not be empty")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"{what} must be non-empty strings; got {bad!r}")
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})
    if dups:
        raise ValueError(f"{what} must be unique; duplicated: {dups}")
    return names


def _short(value: object, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _check_view(value: object, where: str, problems: list[str]) -> tuple[View | None, str | None]:
    """Validate one view; returns (view, kind) with kind 'single' | 'pair', or (None, None)."""
    if isinstance(value, str):
        if not value.strip():
            problems.append(f"{where} is empty or whitespace-only")
            return None, None
        return value, "single"
    if isinstance(value, list):
        if len(value) != 2:
            problems.append(
                f"{where} is a list of {len(value)} element(s); a sentence-pair view must be "
                f'exactly ["premise", "hypothesis"]'
            )
            return None, None
        ok = True
        for j, part in enumerate(value):
            if not isinstance(part, str):
                problems.append(f"{where}[{j}] is {_type_name(part)}, expected a string")
                ok = False
            elif not part.strip():
                problems.append(f"{where}[{j}] is empty or whitespace-only")
                ok = False
        return ((value[0], value[1]), "pair") if ok else (None, None)
    problems.append(
        f"{where} is {_type_name(value)}, expected a string or a 2-element list "
        f'["premise", "hypothesis"]'
    )
    return None, None


def _check_load_args(
    languages: Sequence[str],
    label_names: Sequence[str],
    extra_languages: str,
    max_examples: int | None,
) -> tuple[list[str], list[str]]:
    """(languages, label_names) as lists; ValueError for an invalid argument."""
    languages = _check_names("languages", languages)
    label_names = _check_names("label_names", label_names)
    if extra_languages not in ("error", "ignore"):
        raise ValueError(f"extra_languages must be 'error' or 'ignore', got {extra_languages!r}")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    return languages, label_names


def _raw_lines(path: str | os.PathLike) -> list[bytes]:
    """The file's lines as bytes (no trailing empty line, no byte-order mark)."""
    name, p = str(path), Path(path)
    if not p.exists():
        raise DataError(name, [f"{name}: file not found"])
    if not p.is_file():
        raise DataError(name, [f"{name}: not a regular file"])
    with open(p, "rb") as fh:
        raw_lines = fh.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if raw_lines and raw_lines[0].startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        raw_lines[0] = raw_lines[0][3:]
    return raw_lines


_BLANK = object()
""":func:`_parse_line`'s answer for a blank line (skipped, not counted as a row)."""


def _parse_line(raw: bytes, loc: str, problems: list[str]) -> object:
    """The row's JSON object; ``_BLANK`` for a blank line; None (problem recorded) for a row
    that is not valid UTF-8, not JSON or not an object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{loc}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return None
    if not line.strip():
        return _BLANK
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        problems.append(f"{loc}: invalid JSON ({exc.msg} at column {exc.colno})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{loc}: the row is {_type_name(obj)}, expected a JSON object")
        return None
    return obj


def _kind_name(kind: str) -> str:
    return "sentence pair" if kind == "pair" else "string"


@dataclass
class _RowReader:
    """Validates the rows of one file; remembers what earlier rows fixed (ids, view kind)."""

    languages: list[str]
    label_names: list[str]
    require_label: bool
    extra_languages: str
    ids_seen: dict[str, int] = field(default_factory=dict)
    kind_seen: tuple[str, int, str] | None = None  # (kind, line, where) of the first view

    def row(self, obj: dict, lineno: int, loc: str, problems: list[str]) -> ParallelExample | None:
        """The example of one parsed row, or None with its problems (prefixed with the row)."""
        row_problems: list[str] = []
        ex_id = self.read_id(obj, lineno, row_problems)
        views = self.read_views(obj, lineno, row_problems)
        label = self.read_label(obj, row_problems)
        if row_problems:
            head = f"{loc} (id {ex_id!r})" if ex_id is not None else loc
            problems.extend(f"{head}: {msg}" for msg in row_problems)
            return None
        return ParallelExample(id=ex_id, views=views, label=label)

    def read_id(self, obj: dict, lineno: int, problems: list[str]) -> str | None:
        """The row's id (default: the line number); None when it is invalid."""
        ex_id: str | None = str(lineno)
        if "id" in obj and obj["id"] is not None:
            raw_id = obj["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                problems.append(f"id is {_type_name(raw_id)} {_short(raw_id)}, expected a string")
                return None
            if isinstance(raw_id, str) and not raw_id.strip():
                problems.append("id is empty or whitespace-only")
                return None
            ex_id = str(raw_id)
        if ex_id in self.ids_seen:
            problems.append(
                f"id {ex_id!r} is a duplicate (first used on line {self.ids_seen[ex_id]})"
            )
        else:
            self.ids_seen[ex_id] = lineno
        return ex_id

    def read_views(self, obj: dict, lineno: int, problems: list[str]) -> dict[str, View]:
        """The valid views of the row's ``text`` object, by language."""
        views: dict[str, View] = {}
        text = obj.get("text")
        if "text" not in obj:
            problems.append("text is missing (expected an object mapping language -> view)")
            return views
        if not isinstance(text, dict):
            problems.append(
                f"text is {_type_name(text)}, expected an object mapping language -> view"
            )
            return views
        for lang, value in text.items():
            if lang in self.languages:
                view = self.read_view(lang, value, lineno, problems)
                if view is not None:
                    views[lang] = view
            elif self.extra_languages == "error":
                problems.append(
                    f"text.{lang} is an unknown language (language {lang!r} is not "
                    f"configured; configured: {', '.join(self.languages)})"
                )
        for lang in self.languages:
            if lang not in text:
                problems.append(
                    f"text.{lang} is missing (language {lang!r} is configured but absent "
                    f"from this row)"
                )
        return views

    def read_view(self, lang: str, value: object, lineno: int, problems: list[str]) -> View | None:
        """One valid view of the file's view kind (the first valid view fixes it), or None."""
        view, kind = _check_view(value, f"text.{lang}", problems)
        if view is None:
            return None
        if self.kind_seen is None:
            self.kind_seen = (kind, lineno, f"text.{lang}")
        elif kind != self.kind_seen[0]:
            first_kind, first_line, first_where = self.kind_seen
            problems.append(
                f"text.{lang} is a {_kind_name(kind)} but {first_where} on line {first_line} "
                f"is a {_kind_name(first_kind)} (all views of a file must be of the same kind)"
            )
            return None
        return view

    def read_label(self, obj: dict, problems: list[str]) -> int | None:
        """The label index; None when absent (a problem if required) or invalid."""
        names = self.label_names
        raw_label = obj.get("label")
        if raw_label is None:
            if self.require_label:
                problems.append(
                    f"label is missing (this file must be labeled; labels: {', '.join(names)})"
                )
        elif isinstance(raw_label, bool) or not isinstance(raw_label, (int, str)):
            problems.append(
                f"label is {_type_name(raw_label)} {_short(raw_label)}, expected an int index "
                f"or a label name"
            )
        elif isinstance(raw_label, int):
            if 0 <= raw_label < len(names):
                return raw_label
            problems.append(
                f"label {raw_label} is out of range (label must be in 0..{len(names) - 1}"
                f" or one of the names {', '.join(names)})"
            )
        elif raw_label in names:
            return names.index(raw_label)
        else:
            problems.append(
                f"label {raw_label!r} is not a known label name (labels: {', '.join(names)})"
            )
        return None


def _all_or_none_labeled(
    name: str, examples: list[ParallelExample], lines: list[int], problems: list[str]
) -> None:
    """A file is fully labeled or fully unlabeled: record the first unlabeled row otherwise."""
    labeled = [ex.label is not None for ex in examples]
    if any(labeled) and not all(labeled):
        missing = [i for i, ok in enumerate(labeled) if not ok]
        first = missing[0]
        problems.append(
            f"{name}:{lines[first]} (id {examples[first].id!r}): label is missing "
            f"({sum(labeled)} of {len(labeled)} rows have a label; {len(missing)} do not; "
            f"label every row or none)"
        )


def load_parallel_jsonl(
    path: str | os.PathLike,
    languages: Sequence[str],
    label_names: Sequence[str],
    *,
    require_label: bool,
    max_examples: int | None = None,
    extra_languages: str = "error",
) -> ParallelCorpus:
    """Load and fully validate a parallel JSONL file (format: see the module docstring).

    Args:
        path: the JSONL file.
        languages: the configured language codes; every row must have a view for each.
        label_names: the label set; an int label indexes it, a string label must be in it.
        require_label: every row must carry a label.
        max_examples: read (and validate) only the first ``max_examples`` non-blank rows.
        extra_languages: ``"error"`` (a language key not in ``languages`` is a problem) or
            ``"ignore"`` (such keys are dropped silently).

    Raises:
        DataError: listing up to 20 problems (file, row, id, field, language/label each).
        ValueError: for invalid arguments.
    """
    languages, label_names = _check_load_args(languages, label_names, extra_languages, max_examples)
    name = str(path)
    raw_lines = _raw_lines(path)
    reader = _RowReader(languages, label_names, require_label, extra_languages)
    problems: list[str] = []
    examples: list[ParallelExample] = []
    lines: list[int] = []
    n_rows = 0  # non-blank rows read (blank lines do not count toward max_examples)
    for lineno, raw in enumerate(raw_lines, start=1):
        if max_examples is not None and n_rows >= max_examples:
            break
        obj = _parse_line(raw, f"{name}:{lineno}", problems)
        if obj is _BLANK:
            continue
        n_rows += 1
        example = None if obj is None else reader.row(obj, lineno, f"{name}:{lineno}", problems)
        if example is not None:
            examples.append(example)
            lines.append(lineno)
    if n_rows == 0:
        what = "the file is empty" if not raw_lines else "the file has only blank lines"
        raise DataError(name, [f"{name}: no examples ({what})"])
    if not problems and not require_label:
        _all_or_none_labeled(name, examples, lines, problems)
    if problems:
        raise DataError(name, problems[:MAX_REPORTED], total=len(problems))
    return ParallelCorpus(
        path=name, languages=languages, label_names=label_names, examples=examples
    )


def k_shot(corpus: ParallelCorpus, k: int, seed: int) -> ParallelCorpus:
    """A deterministic random subset of ``k`` examples (kept in file order).

    The same (corpus, k, seed) always gives the same subset, on every machine and rank
    (``random.Random(seed)``, independent of the global RNG state).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n = len(corpus)
    if k > n:
        raise ValueError(f"k={k} is larger than the corpus {corpus.path} ({n} examples)")
    picked = sorted(random.Random(seed).sample(range(n), k))
    return corpus.subset(picked)
