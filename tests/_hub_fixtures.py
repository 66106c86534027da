"""Tiny local copies of the Hub dataset repos XNLI, PAWS-X, XCOPA and COPA (aps/super_glue).

Each repo is written the way the Hub stores it: a ``README.md`` whose YAML front matter lists
``configs`` (one per language, ``data_files`` per split) and ``dataset_info`` features (class
labels as on the Hub), and one parquet file per config and split at
``<config>/<split>-00000-of-00001.parquet``, with the Hub's column names, order and dtypes. So
``datasets.load_dataset(repo_dir, config, split=split)`` reads them exactly like the Hub repos.

Texts are synthetic but shaped like the data and predictable: :func:`text` gives the text of a
column for example ``i`` (XNLI: the row; PAWS-X: the ``id``, 1-based; XCOPA / COPA: the ``idx``)
in a language and split, e.g. ``"premise 3 in fr (test)"``. Labels: :func:`labels`.

Faults (keyword arguments; ``pos`` are 0-based positions in the clean, unshuffled row list, the
same in every split):

``drop_rows={lang: [pos, ...]}``        remove those rows from ``lang`` (XNLI: a language with
                                        fewer rows; PAWS-X / XCOPA: an id absent from ``lang``)
``label_minus1={lang: [pos, ...]}``     label -1 there
``flip_label={lang: [pos, ...]}``       label (y + 1) % |Y| there (disagrees with the others)
``placeholder={lang: {pos: text}}``     the first text column becomes ``text`` (e.g. ``"NS"``,
                                        ``""``); a ``(column, text)`` tuple picks the column
``shuffle=[lang, ...]``                 those languages' rows in a random (seeded) order
``flip_question={lang: [pos, ...]}``    XCOPA: ``cause`` <-> ``effect`` there
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

LANGUAGES = {
    "xnli": "en fr es de el bg ru tr ar vi th zh hi sw ur".split(),
    "pawsx": "en de es fr ja ko zh".split(),
    "xcopa": "et ht id it qu sw ta th tr vi zh".split(),
}
SPLITS = {
    "xnli": ["train", "validation", "test"],
    "pawsx": ["train", "validation", "test"],
    "xcopa": ["validation", "test"],
    "copa": ["train", "validation", "test"],
}
LABEL_NAMES = {
    "xnli": ["entailment", "neutral", "contradiction"],
    "pawsx": ["0", "1"],
    "xcopa": ["choice1", "choice2"],
    "copa": ["choice1", "choice2"],
}
# (column, arrow type) in the Hub's order; "label*" marks a ClassLabel column on the Hub.
SCHEMAS = {
    "xnli": [("premise", pa.string()), ("hypothesis", pa.string()), ("label*", pa.int64())],
    "pawsx": [
        ("id", pa.int32()),
        ("sentence1", pa.string()),
        ("sentence2", pa.string()),
        ("label*", pa.int64()),
    ],
    "xcopa": [
        ("premise", pa.string()),
        ("choice1", pa.string()),
        ("choice2", pa.string()),
        ("question", pa.string()),
        ("label", pa.int32()),
        ("idx", pa.int32()),
        ("changed", pa.bool_()),
    ],
    "copa": [
        ("premise", pa.string()),
        ("choice1", pa.string()),
        ("choice2", pa.string()),
        ("question", pa.string()),
        ("idx", pa.int32()),
        ("label*", pa.int64()),
    ],
}
TEXT_COLUMNS = {
    "xnli": ["premise", "hypothesis"],
    "pawsx": ["sentence1", "sentence2"],
    "xcopa": ["premise", "choice1", "choice2"],
    "copa": ["premise", "choice1", "choice2"],
}
FAULTS = ("drop_rows", "label_minus1", "flip_label", "placeholder", "shuffle", "flip_question")


def key_of(task: str, pos: int) -> int:
    """The example number of clean position ``pos``: XNLI row, PAWS-X id (1-based), idx."""
    return pos + 1 if task == "pawsx" else pos


def text(task: str, column: str, i: int, lang: str, split: str) -> str:
    """The fixture text of ``column`` for example ``i`` (see :func:`key_of`)."""
    return f"{column} {i} in {lang} ({split})"


def question(i: int) -> str:
    """The XCOPA / COPA question of example ``idx == i``."""
    return ("cause", "effect")[i % 2]


def labels(task: str, n: int, *, seed: int = 0, split: str = "test") -> list[int]:
    """The clean gold labels of positions 0..n-1 (the same in every language)."""
    rng = random.Random(f"{task}-{seed}-{split}")
    return [rng.randrange(len(LABEL_NAMES[task])) for _ in range(n)]


def _rows(task: str, lang: str, split: str, n: int, seed: int, faults: dict) -> list[dict]:
    gold = labels(task, n, seed=seed, split=split)
    drop = set(faults.get("drop_rows", {}).get(lang, ()))
    minus1 = set(faults.get("label_minus1", {}).get(lang, ()))
    flip = set(faults.get("flip_label", {}).get(lang, ()))
    flip_q = set(faults.get("flip_question", {}).get(lang, ()))
    holes = faults.get("placeholder", {}).get(lang, {})
    rows = []
    for pos in range(n):
        if pos in drop:
            continue
        i = key_of(task, pos)
        row = {c: text(task, c, i, lang, split) for c in TEXT_COLUMNS[task]}
        label = gold[pos]
        if task == "copa" and split == "test":
            label = -1  # hidden on the Hub
        if pos in flip:
            label = (label + 1) % len(LABEL_NAMES[task])
        if pos in minus1:
            label = -1
        row["label"] = label
        if task == "pawsx":
            row["id"] = i
        if task in ("xcopa", "copa"):
            q = question(i)
            if pos in flip_q:
                q = "effect" if q == "cause" else "cause"
            row["question"] = q
            row["idx"] = i
            row["changed"] = False
        if pos in holes:
            hole = holes[pos]
            col, value = hole if isinstance(hole, tuple) else (TEXT_COLUMNS[task][0], hole)
            row[col] = value
        rows.append(row)
    if lang in faults.get("shuffle", ()):
        random.Random(f"shuffle-{seed}-{lang}-{split}").shuffle(rows)
    return rows


def _features(task: str) -> list[dict]:
    out = []
    for name, typ in SCHEMAS[task]:
        if name.endswith("*"):
            names = {str(k): v for k, v in enumerate(LABEL_NAMES[task])}
            out.append({"name": name[:-1], "dtype": {"class_label": {"names": names}}})
        else:
            out.append({"name": name, "dtype": str(typ)})
    return out


def _write_repo(
    root: Path, task: str, configs: Iterable[str], n: int, seed: int, faults: dict, lang_of=None
) -> Path:
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise TypeError(f"unknown fault(s) {unknown}; known: {FAULTS}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(name.rstrip("*"), typ) for name, typ in SCHEMAS[task]])
    card = {"dataset_info": [], "configs": []}
    for config in configs:
        lang = lang_of(config) if lang_of else config
        (root / config).mkdir(exist_ok=True)
        for split in SPLITS[task]:
            rows = _rows(task, lang, split, n, seed, faults)
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, root / config / f"{split}-00000-of-00001.parquet")
        card["dataset_info"].append({"config_name": config, "features": _features(task)})
        card["configs"].append(
            {
                "config_name": config,
                "data_files": [
                    {"split": split, "path": f"{config}/{split}-*"} for split in SPLITS[task]
                ],
            }
        )
    front = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    (root / "README.md").write_text(f"---\n{front}---\n\n# {task} (test fixture)\n")
    return root


def make_hub_repo(
    root: Path,
    task: str,
    *,
    n: int = 12,
    languages: Iterable[str] | None = None,
    seed: int = 0,
    **faults,
) -> Path:
    """Write a local copy of the ``task`` Hub repo ("xnli", "pawsx", "xcopa") under ``root``.

    ``languages`` (default: all of the task's) are the configs written; every split of the Hub
    repo is written with ``n`` clean rows per language before faults (see the module docstring).
    Returns ``root``.
    """
    if task not in LANGUAGES:
        raise ValueError(f"unknown task {task!r}; fixtures exist for {sorted(LANGUAGES)}")
    langs = list(languages) if languages is not None else LANGUAGES[task]
    return _write_repo(root, task, langs, n, seed, faults)


def make_copa_repo(root: Path, *, n: int = 8, seed: int = 0, **faults) -> Path:
    """Write a local copy of ``aps/super_glue`` with its ``copa`` config (English).

    Splits train / validation / test; as on the Hub, every test label is -1. Texts are
    ``text("copa", column, idx, "en", split)``; faults use the language key ``"en"``.
    """
    return _write_repo(root, "copa", ["copa"], n, seed, faults, lang_of=lambda _: "en")


def vocabulary(task: str, columns: Iterable[str], languages: Iterable[str], n: int) -> list[str]:
    """Every word of the fixture texts (rows 0..n+1, all splits) and of the task's packaged
    templates and verbalizers, as the tiny word-level tokenizers will split them: a tiny model
    built on it knows every word a run needs (an unknown verbalizer word must be an error, not
    an ``<unk>``)."""
    from alsace_ds.data.prompts import load_prompts
    from alsace_ds.models.tiny import _vocab_pieces

    langs = list(languages)
    splits = SPLITS["copa" if task == "copa" else task]
    out = [text(task, c, i, lang, s) for c in columns for i in range(n + 2) for lang in langs
           for s in splits]  # fmt: skip
    prompt_task = "xcopa" if task == "copa" else task
    prompt_langs = ["en"] if task == "copa" else langs
    for prompt in load_prompts(prompt_task, prompt_langs).values():
        for tpl in (prompt.template, prompt.classification):
            parts = tpl if isinstance(tpl, list) else [tpl] if tpl else []
            out += [p.replace("{", " ").replace("}", " ") for p in parts]
        out += list(prompt.verbalizer) + list((prompt.question or {}).values())
    return _vocab_pieces(out)
