"""Load XNLI, PAWS-X and XCOPA by name with ``datasets`` into :class:`ParallelCorpus` objects.

Every split of every language is read with exactly one call::

    datasets.load_dataset(source, config_name, split=split)

``source`` defaults to the task's Hugging Face Hub id (:data:`TASKS`). A local directory laid
out like the Hub repo -- a ``README.md`` whose YAML front matter has ``configs:`` entries
(``config_name`` plus ``data_files`` per split) and the parquet / jsonl files they point to --
goes through the very same call (``datasets`` resolves an existing directory before trying the
Hub). Nothing here sets a cache directory or an offline flag: the caller's ``HF_*`` settings
apply.

Tasks (public Hub schemas)
==========================
``xnli``  ``facebook/xnli``, one config per language (15). Columns ``premise``, ``hypothesis``,
    ``label`` (0 entailment, 1 neutral, 2 contradiction). No id column: the languages are
    parallel by row position, so every language must have the same number of rows and the same
    label at each row. Example ids are ``"<split>-<row>"`` (row 0-based).
``pawsx`` ``google-research-datasets/paws-x``, configs ``en de es fr ja ko zh``. Columns ``id``,
    ``sentence1``, ``sentence2``, ``label`` (0/1). Views are joined on ``id`` (not on row
    position). Example ids are ``str(id)``.
``xcopa`` ``cambridgeltl/xcopa``, 11 configs (no English), splits validation / test. Columns
    ``premise``, ``choice1``, ``choice2``, ``question`` (``cause`` | ``effect``), ``label``
    (0 = choice1, 1 = choice2), ``idx``. Views are joined on ``idx``; label and question must
    agree across languages. The English training set is COPA (``aps/super_glue``, config
    ``copa``, same columns; its test labels are hidden as -1 and never used).

Views: ``(premise, hypothesis)`` / ``(sentence1, sentence2)`` for the pair tasks; the 4-tuple
``(premise, question, choice1, choice2)`` for XCOPA / COPA.

Rows that are dropped (and reported, never silently)
====================================================
Per language, a row is dropped for one reason, checked in this order:

``"label -1"``          its label is -1 (the Hub's "missing or wrong label"); only when labels
                        are required (``require_label=True``).
``"placeholder text"``  a text field is missing, empty, whitespace-only, or a task placeholder
                        (PAWS-X: the literal ``"NS"``).
``"absent in another language"``  the row is fine, but its id (row position for XNLI) was
                        dropped from, or never present in, another requested language.

An example is kept only when it is kept in every requested language. The kept examples come in
the row order of the first requested language (the Hub files are in id / idx order), and
``max_examples`` keeps the first N of them. :class:`LoadReport` gives the counts.

Errors
======
Problems that mean the data is not what the schema promises -- a missing column, a wrong type,
a label outside the label set, a duplicated id, XNLI languages of different lengths, labels (or
XCOPA questions) that differ across languages for a kept example, a failed ``load_dataset``,
nothing left after dropping -- raise one :class:`~alsace_ds.data.corpus.DataError` naming the task,
split, language and row / id (rows are 0-based positions in that language's split). Unknown
task / split / language names raise ``ValueError`` in :func:`check_request`, before anything is
loaded.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from alsace_ds.data.corpus import MAX_REPORTED, DataError, ParallelCorpus, ParallelExample

LABEL_MISSING = "label -1"
PLACEHOLDER = "placeholder text"
ABSENT = "absent in another language"
REASONS = (LABEL_MISSING, PLACEHOLDER, ABSENT)
"""The drop reasons, in the order they are checked and reported."""


@dataclass(frozen=True)
class HubTaskSpec:
    """Where a task lives on the Hub and how its rows become parallel examples.

    Attributes:
        name: the task name (key of :data:`TASKS`).
        source: the Hub dataset id; each language is the config of the same name.
        languages: every language (config) the task has.
        label_names: the label set; a row's integer label indexes it (-1: missing).
        splits: the splits every language config has.
        english: the language whose config is the English training set, or None when the
            English training data comes from another dataset (``english_source``).
        view_kind: ``"pair"`` (2-tuple views) or ``"choice"`` (4-tuple multiple-choice views).
        text_columns: the columns that make a view, in view order.
        label_column: the gold-label column.
        id_column: the column the languages are joined on; None: joined by row position.
        agree_columns: columns (besides the label) that must be equal across languages.
        question_values: if non-empty, the allowed values of the ``question`` column.
        placeholders: literal texts (after stripping) that mean "no translation".
        english_source: the Hub id of the English training data when it is another dataset.
        english_config: that dataset's config name.
        english_splits: that dataset's splits with usable gold labels.
    """

    name: str
    source: str
    languages: tuple[str, ...]
    label_names: tuple[str, ...]
    splits: tuple[str, ...]
    english: str | None
    view_kind: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    id_column: str | None = None
    agree_columns: tuple[str, ...] = ()
    question_values: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()
    english_source: str | None = None
    english_config: str | None = None
    english_splits: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the loader reads."""
        cols = list(self.text_columns) + [self.label_column]
        cols += [c for c in self.agree_columns if c not in cols]
        if self.id_column is not None:
            cols.append(self.id_column)
        return tuple(cols)

    @property
    def train_splits(self) -> tuple[str, ...]:
        """The splits :func:`load_english_train` accepts."""
        return self.english_splits if self.english_source is not None else self.splits


TASKS: dict[str, HubTaskSpec] = {
    "xnli": HubTaskSpec(
        name="xnli",
        source="facebook/xnli",
        languages=tuple("en fr es de el bg ru tr ar vi th zh hi sw ur".split()),
        label_names=("entailment", "neutral", "contradiction"),
        splits=("train", "validation", "test"),
        english="en",
        view_kind="pair",
        text_columns=("premise", "hypothesis"),
    ),
    "pawsx": HubTaskSpec(
        name="pawsx",
        source="google-research-datasets/paws-x",
        languages=tuple("en de es fr ja ko zh".split()),
        label_names=("not_paraphrase", "paraphrase"),  # the Hub: ClassLabel 0 / 1
        splits=("train", "validation", "test"),
        english="en",
        view_kind="pair",
        text_columns=("sentence1", "sentence2"),
        id_column="id",
        placeholders=("NS",),
    ),
    "xcopa": HubTaskSpec(
        name="xcopa",
        source="cambridgeltl/xcopa",
        languages=tuple("et ht id it qu sw ta th tr vi zh".split()),
        label_names=("choice1", "choice2"),
        splits=("validation", "test"),
        english=None,
        view_kind="choice",
        text_columns=("premise", "question", "choice1", "choice2"),
        id_column="idx",
        agree_columns=("question",),
        question_values=("cause", "effect"),
        english_source="aps/super_glue",
        english_config="copa",
        english_splits=("train", "validation"),  # COPA's test labels are -1 (hidden)
    ),
}


@dataclass
class LoadReport:
    """What one load kept and dropped.

    Attributes:
        task, split: what was loaded.
        kept: the number of examples in the returned corpus.
        dropped: per requested language, per reason (:data:`REASONS`), the number of that
            language's rows dropped; only non-zero counts are listed (``{}``: none dropped).
        rows: per language, the number of rows the source has in this split.
        truncated: joinable examples left out by ``max_examples``.
        notes: anything else worth telling (e.g. why a corpus came back unlabeled).
    """

    task: str
    split: str
    kept: int
    dropped: dict[str, dict[str, int]]
    rows: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary: one head line, one line per language with drops, notes."""
        counts = sorted(set(self.rows.values()))
        if not counts:
            of = ""
        elif len(counts) == 1:
            of = f" of {counts[0]} rows"
        else:
            of = f" of {counts[0]}-{counts[-1]} rows"
        head = f"{self.task} {self.split}: kept {self.kept}{of}"
        if self.truncated:
            head += f" (max_examples: first {self.kept} of {self.kept + self.truncated} joinable)"
        if not any(self.dropped.values()):
            head += "; nothing dropped"
        out = [head]
        for lang, reasons in self.dropped.items():
            if reasons:
                parts = [f"{reasons[r]} {r}" for r in REASONS if reasons.get(r)]
                out.append(f"  {lang}: " + ", ".join(parts))
        out.extend(f"  note: {n}" for n in self.notes)
        return out


# ------------------------------------------------------------------------------ requests


def _fmt(names) -> str:
    return ", ".join(names)


def _check_languages(spec: HubTaskSpec, languages) -> list[str]:
    if isinstance(languages, str) or not isinstance(languages, (list, tuple)):
        raise ValueError(
            f"{spec.name}: languages must be a list of language codes, got {languages!r}"
        )
    langs = list(languages)
    if not langs:
        raise ValueError(
            f"{spec.name}: languages must not be empty (valid: {_fmt(spec.languages)})"
        )
    dups = sorted({x for x in langs if langs.count(x) > 1}, key=str)
    if dups:
        raise ValueError(f"{spec.name}: languages must be unique; duplicated: {dups}")
    return langs


def check_request(task: str, split: str, languages: list[str]) -> None:
    """Refuse an unknown task, split or language before anything is loaded.

    Raises:
        ValueError: naming every unknown name and listing the valid ones.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (valid tasks: {_fmt(TASKS)})")
    spec = TASKS[task]
    langs = _check_languages(spec, languages)
    problems = []
    unknown = [x for x in langs if x not in spec.languages]
    if unknown:
        msg = (
            f"unknown language{'s' if len(unknown) > 1 else ''} "
            f"{_fmt(repr(x) for x in unknown)} for {task} (valid: {_fmt(spec.languages)})"
        )
        if spec.english is None and "en" in unknown:
            msg += (
                f"; {task} has no English config: its English training data is "
                f"{spec.english_source} ({spec.english_config}), see load_english_train"
            )
        problems.append(msg)
    if split not in spec.splits:
        problems.append(f"unknown split {split!r} for {task} (valid: {_fmt(spec.splits)})")
    if problems:
        raise ValueError("; ".join(problems))


def _check_max_examples(max_examples) -> None:
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")


# ------------------------------------------------------------------------------- loading


def _resolve_source(source: str | os.PathLike | None, default: str) -> tuple[str, bool]:
    """(the string given to load_dataset, whether it is a local directory)."""
    if source is None:
        return default, False
    src = os.path.expanduser(os.fspath(source))
    return src, os.path.isdir(src)


def _looks_like_path(src: str) -> bool:
    return src.startswith(("/", "./", "../", "~")) or src.count("/") > 1


def _describe(src: str, local: bool, split: str, config: str | None = None) -> str:
    base = src if local else f"hf:{src}"
    if config is not None:
        base += f":{config}"
    return f"{base}[{split}]"


def _read(
    task: str, src: str, local: bool, config: str, split: str, lang: str, columns, path: str
) -> dict[str, list]:
    """One ``load_dataset`` call -> the needed columns as python lists."""
    if not local and _looks_like_path(src):
        raise DataError(path, [f"{task} {split} [{lang}]: source {src!r} is not a directory"])
    import datasets  # imported here: a second's import, only when loading

    try:
        ds = datasets.load_dataset(src, config, split=split)
    except Exception as exc:  # network, missing config / split, unreadable files, ...
        raise DataError(
            path,
            [
                f"{task} {split} [{lang}]: load_dataset({src!r}, {config!r}, split={split!r}) "
                f"failed: {type(exc).__name__}: {exc}"
            ],
        ) from exc
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            path,
            [
                f"{task} {split} [{lang}]: column{'s' if len(missing) > 1 else ''} "
                f"{_fmt(missing)} missing from config {config!r} (it has {_fmt(ds.column_names)})"
            ],
        )
    data = ds.select_columns(list(columns)).to_dict()
    return {c: list(data[c]) for c in columns}


@dataclass
class _Row:
    row: int
    view: tuple[str, ...]
    label: int | None  # None: -1 with require_label=False
    agree: tuple


@dataclass
class _Checks:
    """The split being built and the schema problems found so far (raised together)."""

    spec: HubTaskSpec
    split: str
    problems: list[str] = field(default_factory=list)

    def where(self, lang: str, r: int, key: object = None) -> str:
        w = f"{self.spec.name} {self.split} [{lang}] row {r}"
        return w if self.spec.id_column is None else f"{w} ({self.spec.id_column} {key!r})"


def _row_key(chk: _Checks, lang: str, cols: dict[str, list], r: int, first_row: dict) -> str | None:
    """Row r's join key (its position for XNLI, else its id); None for an invalid id or a
    duplicate (problem recorded). ``first_row`` maps the keys seen so far to their row."""
    id_col = chk.spec.id_column
    if id_col is None:
        return str(r)
    raw = cols[id_col][r]
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or raw == "":
        chk.problems.append(f"{chk.where(lang, r, raw)}: {id_col} must be an int")
        return None
    key = str(raw)
    if key in first_row:
        chk.problems.append(
            f"{chk.where(lang, r, raw)}: duplicate {id_col} (also on row {first_row[key]})"
        )
        return None
    first_row[key] = r
    return key


def _label_ok(chk: _Checks, at: str, label: object) -> bool:
    """Whether ``label`` is an int in -1..C-1 (-1: missing); records the problem if not."""
    n_labels = len(chk.spec.label_names)
    if isinstance(label, bool) or not isinstance(label, int):
        chk.problems.append(f"{at}: label is {type(label).__name__} {label!r}, expected an int")
        return False
    if not -1 <= label < n_labels:
        chk.problems.append(
            f"{at}: label {label} is out of range (0..{n_labels - 1} "
            f"for {_fmt(chk.spec.label_names)}, or -1 for missing)"
        )
        return False
    return True


def _texts(chk: _Checks, at: str, cols: dict[str, list], r: int) -> tuple[list, bool, bool]:
    """(view texts, whether one is a placeholder, whether one has the wrong type)."""
    view, placeholder, bad = [], False, False
    for c in chk.spec.text_columns:
        text = cols[c][r]
        if text is not None and not isinstance(text, str):
            chk.problems.append(f"{at}: {c} is {type(text).__name__}, expected a string")
            bad = True
        elif text is None or not text.strip() or text.strip() in chk.spec.placeholders:
            placeholder = True
        view.append(text)
    return view, placeholder, bad


def _check_row(
    chk: _Checks, lang: str, cols: dict[str, list], r: int, key: str, require_label: bool
) -> tuple[_Row | None, str | None]:
    """(the row, None) if kept, (None, drop reason) if dropped, (None, None) if invalid."""
    spec, at = chk.spec, chk.where(lang, r, key)
    label = cols[spec.label_column][r]
    bad = not _label_ok(chk, at, label)
    view, placeholder, bad_text = _texts(chk, at, cols, r)
    agree = tuple(cols[c][r] for c in spec.agree_columns)
    if spec.question_values and cols["question"][r] not in spec.question_values:
        chk.problems.append(
            f"{at}: question is {cols['question'][r]!r}, expected one "
            f"of {_fmt(spec.question_values)}"
        )
        bad = True
    if bad or bad_text:
        return None, None
    if label == -1 and require_label:
        return None, LABEL_MISSING
    if placeholder:
        return None, PLACEHOLDER
    return _Row(r, tuple(view), None if label == -1 else label, agree), None


def _language_rows(
    chk: _Checks, lang: str, cols: dict[str, list], require_label: bool, dropped: Counter
) -> tuple[dict[str, _Row], list[str]]:
    """(kept rows by key, every valid key in row order) of one language; drops counted."""
    valid: dict[str, _Row] = {}
    order: list[str] = []
    first_row: dict[str, int] = {}
    for r in range(len(cols[chk.spec.label_column])):
        key = _row_key(chk, lang, cols, r, first_row)
        if key is None:
            continue
        order.append(key)
        row, reason = _check_row(chk, lang, cols, r, key, require_label)
        if reason is not None:
            dropped[reason] += 1
        elif row is not None:
            valid[key] = row
    return valid, order


def _check_lengths(chk: _Checks, rows_of: dict[str, int]) -> None:
    """XNLI is parallel by row position, so every language needs the same number of rows.
    The reference is the most common length (ties: the earliest language)."""
    if chk.spec.id_column is not None or len(set(rows_of.values())) <= 1:
        return
    task, split, langs = chk.spec.name, chk.split, list(rows_of)
    counts = Counter(rows_of.values())
    ref = next(x for x in langs if counts[rows_of[x]] == max(counts.values()))
    ref_n = rows_of[ref]
    for lang in langs:
        n = rows_of[lang]
        if n < ref_n:
            chk.problems.append(
                f"{task} {split} [{lang}] row {n}: absent ('{lang}' has {n} rows, "
                f"'{ref}' has {ref_n}; {task} languages are parallel by row position)"
            )
        elif n > ref_n:
            chk.problems.append(
                f"{task} {split} [{lang}] row {ref_n}: no counterpart in '{ref}' ('{lang}' "
                f"has {n} rows, '{ref}' has {ref_n}; {task} languages are parallel by row "
                f"position)"
            )


def _join(
    langs: list[str],
    order: dict[str, list[str]],
    valid: dict[str, dict[str, _Row]],
    dropped: dict[str, Counter],
) -> list[str]:
    """The keys kept in every language, in the first language's row order; the others are
    counted as dropped (reason ``ABSENT``) in the languages that kept them."""
    first = langs[0]
    joined = [k for k in order[first] if k in valid[first] and all(k in valid[x] for x in langs)]
    joined_set = set(joined)
    for lang in langs:
        absent = sum(1 for k in valid[lang] if k not in joined_set)
        if absent:
            dropped[lang][ABSENT] += absent
    return joined


def _at(id_col: str | None, row: _Row) -> str:
    return "" if id_col is None else f" (row {row.row})"


def _example(chk: _Checks, key: str, rows: dict[str, _Row]) -> ParallelExample:
    """The parallel example of one joined key (``rows``: language -> its row); labels and
    the agree columns must match across languages (problems recorded)."""
    spec, id_col, split = chk.spec, chk.spec.id_column, chk.split
    ref_lang, ref_label, ref_agree = None, None, None
    for lang, row in rows.items():
        what = f"row {row.row}" if id_col is None else f"{id_col} {key!r}"
        at = _at(id_col, row)
        if row.label is not None:
            if ref_label is None:
                ref_lang, ref_label = lang, row.label
            elif row.label != ref_label:
                chk.problems.append(
                    f"{spec.name} {split} {what}: label {row.label} in '{lang}'{at} but "
                    f"{ref_label} in '{ref_lang}'{_at(id_col, rows[ref_lang])}; "
                    f"labels must agree across languages"
                )
        if ref_agree is None:
            ref_agree = (lang, row.agree)
        elif row.agree != ref_agree[1]:
            for c, a, b in zip(spec.agree_columns, row.agree, ref_agree[1], strict=True):
                if a != b:
                    chk.problems.append(
                        f"{spec.name} {split} {what}: {c} {a!r} in '{lang}'{at} but {b!r} in "
                        f"'{ref_agree[0]}'{_at(id_col, rows[ref_agree[0]])}; "
                        f"{c} must agree across languages"
                    )
    ex_id = f"{split}-{key}" if id_col is None else key
    return ParallelExample(id=ex_id, views={x: r.view for x, r in rows.items()}, label=ref_label)


def _unlabeled_note(examples: list[ParallelExample]) -> list[str]:
    """With labels optional: a corpus is fully labeled or fully unlabeled, so one example
    without a label in any language makes the whole corpus unlabeled (in place)."""
    unlabeled = sum(1 for ex in examples if ex.label is None)
    if not unlabeled:
        return []
    for ex in examples:
        ex.label = None
    return [
        f"{unlabeled} kept example(s) have label -1 in every language, so the corpus "
        f"is returned unlabeled (a corpus is fully labeled or fully unlabeled)"
    ]


def _build(
    spec: HubTaskSpec,
    split: str,
    tables: dict[str, dict[str, list]],
    path: str,
    *,
    require_label: bool,
    max_examples: int | None,
) -> tuple[ParallelCorpus, LoadReport]:
    """Validate, drop, join and truncate; ``tables`` maps language -> column -> values."""
    chk, langs = _Checks(spec, split), list(tables)
    rows_of = {lang: len(tables[lang][spec.label_column]) for lang in langs}
    dropped: dict[str, Counter] = {lang: Counter() for lang in langs}
    valid: dict[str, dict[str, _Row]] = {}
    order: dict[str, list[str]] = {}
    for lang in langs:
        valid[lang], order[lang] = _language_rows(
            chk, lang, tables[lang], require_label, dropped[lang]
        )
    _check_lengths(chk, rows_of)
    joined = _join(langs, order, valid, dropped)
    examples = [_example(chk, k, {x: valid[x][k] for x in langs}) for k in joined]
    if chk.problems:
        raise DataError(path, chk.problems[:MAX_REPORTED], total=len(chk.problems))
    notes = [] if require_label else _unlabeled_note(examples)
    truncated = 0
    if max_examples is not None and len(examples) > max_examples:
        truncated = len(examples) - max_examples
        examples = examples[:max_examples]
    report = LoadReport(
        task=spec.name,
        split=split,
        kept=len(examples),
        dropped={lang: {r: n for r in REASONS if (n := dropped[lang][r])} for lang in langs},
        rows=rows_of,
        truncated=truncated,
        notes=notes,
    )
    if not examples:
        head = f"{spec.name} {split}: no examples left after dropping rows"
        raise DataError(path, [head] + report.lines()[1:])
    corpus = ParallelCorpus(
        path=path, languages=langs, label_names=list(spec.label_names), examples=examples
    )
    return corpus, report


def load_task_split(
    task: str,
    split: str,
    languages: list[str],
    *,
    source: str | os.PathLike | None = None,
    max_examples: int | None = None,
    require_label: bool = True,
) -> tuple[ParallelCorpus, LoadReport]:
    """Load one split of ``task`` in ``languages`` as a parallel corpus.

    Args:
        task: a key of :data:`TASKS`.
        split: one of the task's splits.
        languages: language codes of the task (each is a config of the source); the first one
            fixes the example order.
        source: the Hub id or a local directory with the same layout (default: the task's
            Hub id). Each language is read with ``load_dataset(source, lang, split=split)``.
        max_examples: keep only the first N joined examples (after dropping).
        require_label: drop rows whose label is -1 (reason ``"label -1"``). With False such
            rows are kept; if a kept example has no label in any language, the whole corpus is
            returned unlabeled (see ``LoadReport.notes``).

    Returns:
        The corpus (``languages`` in the given order, views as tuples of str) and its report.

    Raises:
        ValueError: an unknown task / split / language or a bad argument (nothing loaded).
        DataError: a load failure or a schema / parallelism problem (see the module docstring).
    """
    check_request(task, split, languages)
    _check_max_examples(max_examples)
    spec = TASKS[task]
    src, local = _resolve_source(source, spec.source)
    path = _describe(src, local, split)
    tables = {
        lang: _read(task, src, local, lang, split, lang, spec.columns, path) for lang in languages
    }
    return _build(spec, split, tables, path, require_label=require_label, max_examples=max_examples)


def load_english_train(
    task: str, *, source: str | os.PathLike | None = None, split: str = "train"
) -> tuple[ParallelCorpus, LoadReport]:
    """The labeled English training set for stage 0; the corpus languages are ``["en"]``.

    XNLI / PAWS-X: the ``en`` config of the task's source. XCOPA: COPA, ``load_dataset(
    "aps/super_glue", "copa", split=split)`` (``source`` then replaces ``aps/super_glue``);
    only its train and validation splits have gold labels. Rows with label -1 are dropped.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (valid tasks: {_fmt(TASKS)})")
    spec = TASKS[task]
    if split not in spec.train_splits:
        hint = ""
        if spec.english_source is not None and split in ("test",):
            hint = f"; {spec.english_source} {spec.english_config} test labels are hidden (-1)"
        raise ValueError(
            f"unknown split {split!r} for the {task} English training data "
            f"(valid: {_fmt(spec.train_splits)}){hint}"
        )
    if spec.english_source is not None:
        src, local = _resolve_source(source, spec.english_source)
        config = spec.english_config
    else:
        src, local = _resolve_source(source, spec.source)
        config = spec.english
    path = _describe(src, local, split, config)
    table = _read(task, src, local, config, split, "en", spec.columns, path)
    corpus, report = _build(spec, split, {"en": table}, path, require_label=True, max_examples=None)
    if spec.english_source is not None:
        report.notes.append(f"English training data of {task}: {path}")
    return corpus, report
