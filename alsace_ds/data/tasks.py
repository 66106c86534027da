"""Resolve the configured task into validated corpora, BEFORE any process group or model.

Every data problem (missing language in a row, empty text, label outside the label set,
unknown language code, views that are not parallel, a template without a mask token, a label
word the tokenizer does not know, ...) surfaces here with the file or dataset, row, field and
language named, so a bad input never costs GPU time.

Sources of a task:
- ``embedded``: the synthetic parallel task built locally (:mod:`alsace_ds.data.embedded`);
- ``jsonl``: your own files in the parallel JSONL format (:mod:`alsace_ds.data.corpus`);
- ``xnli`` / ``pawsx`` / ``xcopa``: loaded by name with ``datasets`` (:mod:`alsace_ds.data.hub`),
  one split per role (:data:`DEFAULT_SPLITS`), with ``"validation[:500]"``-style slices.

Heads that read label words (XLM-R cloze, mT5) see each view rendered through the task's
per-language template (:mod:`alsace_ds.data.prompts`); the classification head sees the raw views.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from alsace_ds.config import (
    EMBEDDED,
    HUB_TASKS,
    Config,
    ConfigError,
    label_word_problems,
    resolve_path,
    teacher_problems,
)
from alsace_ds.data.corpus import DataError, ParallelCorpus, k_shot, load_parallel_jsonl
from alsace_ds.data.pretraining import corpus_size_problems

# Hub tasks: the split that feeds each role. Unlabeled and dev are disjoint slices of the
# validation split, the report uses the test split (the paper's unlabeled data were generated
# and translated; a user with such a corpus points task.unlabeled_file at it).
DEFAULT_SPLITS = {
    "xnli": {"train": "train", "unlabeled": "validation[:500]", "dev": "validation[-500:]",
             "test": "test"},
    "pawsx": {"train": "train", "unlabeled": "validation[:500]", "dev": "validation[-500:]",
              "test": "test"},
    # XCOPA has 100 validation rows and no English view (no English dev accuracy).
    "xcopa": {"train": "train", "unlabeled": "validation", "dev": None, "test": "test"},
}  # fmt: skip

MASK_TOKENS = {"mt5": "<extra_id_0>"}  # xlmr: the tokenizer's own mask token

_SLICE = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[(-?\d*):(-?\d*)\])?$")


def cache_dir() -> Path:
    """Where locally built assets live (``ALSACE_CACHE``, default ``~/.cache/alsace_ds``)."""
    return Path(os.environ.get("ALSACE_CACHE", Path.home() / ".cache" / "alsace_ds"))


@dataclass
class TaskData:
    languages: list[str]
    english: str | None  # reference of the transfer gap; None = accuracies only (XCOPA)
    label_names: list[str]
    # Rows of the label-word table (cloze / mT5), one per language in `prompt_languages`
    # order; None for the classification head.
    label_words: list[list[str]] | None
    model_source: str  # folder or Hub name the first stage loads
    train: ParallelCorpus | None  # English, labeled (stage 0)
    unlabeled: ParallelCorpus  # parallel; labels never used
    dev: ParallelCorpus | None  # parallel, labeled (monitoring)
    test: ParallelCorpus  # parallel, labeled (report)
    head: str = "classification"
    train_language: str = "en"  # the language of the stage-0 views
    # languages + the training language when it is not one of them (XCOPA: COPA's "en");
    # a view's row in the label-word table is its index here.
    prompt_languages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # dropped rows, overlaps, label-word splits

    def __post_init__(self) -> None:
        if not self.prompt_languages:
            extra = [] if self.train_language in self.languages else [self.train_language]
            self.prompt_languages = [*self.languages, *extra]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def lang_id(self, lang: str) -> int:
        return self.prompt_languages.index(lang)


# ----------------------------------------------------------------------------- splits


def parse_split(spec: str) -> tuple[str, slice]:
    """``"validation[:500]"`` -> (``"validation"``, ``slice(None, 500)``)."""
    m = _SLICE.match(spec.strip())
    if not m:
        raise ConfigError([f"split {spec!r}: expected NAME or NAME[start:stop], e.g. test[:500]"])
    start, stop = (int(x) if x not in (None, "") else None for x in m.group(2, 3))
    return m.group(1), slice(start, stop)


def _sliced(corpus: ParallelCorpus, part: slice, spec: str) -> ParallelCorpus:
    picked = range(len(corpus))[part]
    if len(picked) == 0:
        raise ConfigError([f"split {spec!r} selects no example of {corpus.path} ({len(corpus)})"])
    out = corpus.subset(list(picked))
    out.path = f"{corpus.path}{spec[spec.index('[') :]}" if "[" in spec else corpus.path
    return out


# ----------------------------------------------------------------------------- sources


def _with_embedded(cfg: Config) -> Config:
    """Fill the task/model fields the user left empty from the embedded task (built here)."""
    from alsace_ds.data.embedded import build_embedded

    assets = build_embedded(cache_dir(), cfg.model.family)
    task = cfg.task
    unknown = [x for x in task.languages if x not in assets.languages]
    if unknown:
        raise ConfigError(
            [f"task.languages: {unknown} are not languages of the embedded task {assets.languages}"]
        )
    new_task = dataclasses.replace(
        task,
        languages=task.languages or list(assets.languages),
        labels=task.labels or list(assets.label_names),
        train_file=task.train_file or str(assets.train_file),
        unlabeled_file=task.unlabeled_file or str(assets.unlabeled_file),
        dev_file=task.dev_file or str(assets.dev_file),
        test_file=task.test_file or str(assets.test_file),
    )
    model = cfg.model
    if model.name_or_path == EMBEDDED:
        model = dataclasses.replace(model, name_or_path=str(assets.model_dir))
    return dataclasses.replace(cfg, task=new_task, model=model)


def _with_hub_defaults(cfg: Config) -> Config:
    """Languages, labels and splits of a Hub task where the config leaves them empty."""
    from alsace_ds.data.hub import TASKS, check_request

    t = cfg.task
    spec = TASKS[t.name]
    splits = DEFAULT_SPLITS[t.name]
    # XCOPA has no English view: its default reference language is none (accuracies only).
    english = None if spec.english is None and t.english == "en" else t.english
    new = dataclasses.replace(
        t,
        languages=t.languages or list(spec.languages),
        labels=t.labels or list(spec.label_names),
        english=english,
        train_split=t.train_split or splits["train"],
        unlabeled_split=t.unlabeled_split or splits["unlabeled"],
        dev_split=t.dev_split if t.dev_split is not None else splits["dev"],
        test_split=t.test_split or splits["test"],
    )
    if new.labels != list(spec.label_names):
        raise ConfigError(
            [f"task.labels: {new.labels} differ from {t.name}'s labels {list(spec.label_names)}"]
        )
    problems = []
    for role in ("unlabeled", "dev", "test"):
        split = getattr(new, f"{role}_split")
        if split is None:
            continue
        try:
            check_request(t.name, parse_split(split)[0], new.languages)
        except ValueError as exc:
            problems.append(f"task.{role}_split: {exc}")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, task=new)


def _load_hub(cfg: Config, notes: list[str]):
    from alsace_ds.data.hub import TASKS, load_english_train, load_task_split

    t = cfg.task

    def split(role: str, require_label: bool, max_examples: int | None = None):
        spec = getattr(t, f"{role}_split")
        if spec is None:
            return None
        name, part = parse_split(spec)
        corpus, report = load_task_split(
            t.name, name, t.languages, source=t.source, require_label=require_label
        )
        notes.extend(report.lines())
        corpus = _sliced(corpus, part, spec)
        if max_examples is not None and len(corpus) > max_examples:
            corpus = corpus.subset(list(range(max_examples)))
        return corpus

    train = None
    if cfg.stage0.enabled:
        name, part = parse_split(t.train_split)
        # XNLI / PAWS-X train on their own repo's "en" config; XCOPA on COPA (another repo).
        same_repo = TASKS[t.name].english_source is None
        source = t.train_source or (t.source if same_repo else None)
        train, report = load_english_train(t.name, source=source, split=name)
        notes.extend(report.lines())
        train = _sliced(train, part, t.train_split)
    return (
        train,
        split("unlabeled", require_label=False, max_examples=t.max_unlabeled),
        split("dev", require_label=True),
        split("test", require_label=True),
    )


def _load_files(cfg: Config, embedded: bool):
    t = cfg.task
    # Our own embedded files carry all their languages; a configured subset drops the rest.
    extra = "ignore" if embedded else "error"

    def load(path: str | None, require_label: bool, max_examples: int | None = None):
        if path is None:
            return None
        return load_parallel_jsonl(
            resolve_path(path),
            t.languages,
            t.labels,
            require_label=require_label,
            max_examples=max_examples,
            extra_languages=extra,
        )

    train = None
    if cfg.stage0.enabled:
        train = load_parallel_jsonl(
            resolve_path(t.train_file),
            [t.english],
            t.labels,
            require_label=True,
            extra_languages="ignore",
        )
    return (
        train,
        load(t.unlabeled_file, require_label=False, max_examples=t.max_unlabeled),
        load(t.dev_file, require_label=True),
        load(t.test_file, require_label=True),
    )


# ----------------------------------------------------------------------------- checks


def find_overlap(a: ParallelCorpus, b: ParallelCorpus) -> list[str]:
    """Ids of ``a``'s examples sharing a view (same language, same text) with ``b``."""
    langs = [x for x in a.languages if x in b.languages]
    seen = {(lang, ex.views[lang]) for ex in b.examples for lang in langs}
    return [ex.id for ex in a.examples if any((x, ex.views[x]) in seen for x in langs)]


def check_overlaps(cfg: Config, unlabeled, dev, test, train, notes: list[str]) -> dict:
    """The unlabeled corpus (and the English training set) must not share examples with the
    sets that judge the run; refused unless ``task.allow_overlap`` (then noted in the report)."""
    found = {}
    pairs = [("unlabeled", unlabeled, "test", test), ("unlabeled", unlabeled, "dev", dev),
             ("train", train, "test", test)]  # fmt: skip
    for name_a, a, name_b, b in pairs:
        if a is None or b is None:
            continue
        ids = find_overlap(a, b)
        if ids:
            found[f"{name_a}/{name_b}"] = len(ids)
            msg = (
                f"{len(ids)} of {len(a)} {name_a} examples ({a.path}) share a view with the "
                f"{name_b} set ({b.path}); first ids {ids[:5]}"
            )
            if not cfg.task.allow_overlap:
                raise ConfigError(
                    [f"task: {msg}. Choose disjoint splits/files, or set task.allow_overlap=true "
                     "(the report will say so)"]
                )  # fmt: skip
            notes.append(f"OVERLAP (allowed by task.allow_overlap): {msg}")
    return found


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def check_label_words(tok, rows: list[list[str]], languages: list[str], notes: list[str]):
    """Every label word must map to a token the tokenizer knows (first piece of a split word,
    noted); checked here so that a bad verbalizer fails before any model is loaded."""
    from alsace_ds.models.scorers import label_word_token_ids

    problems = []
    for lang, words in zip(languages, rows, strict=True):
        try:
            _, warnings = label_word_token_ids(tok, words)
        except ValueError as exc:
            problems.append(f"verbalizer of language {lang!r}: {exc}")
            continue
        notes.extend(f"verbalizer {lang}: {w}" for w in warnings)
    if problems:
        raise ConfigError(problems, "label words")


def _prompted(cfg: Config, data: TaskData, tok) -> TaskData:
    """Render every corpus through the per-language templates and build the label-word rows."""
    from alsace_ds.data.prompts import FIELDS, check_prompts, load_prompts, render_corpus

    t, m = cfg.task, cfg.model
    head = data.head
    task_key = t.name if t.name in HUB_TASKS else "jsonl"
    if head == "classification":
        if t.name != "xcopa":
            return data  # pairs / single texts go to the classification head as they are
        form = "classification"
    else:
        form = "cloze"
    needs_template = t.name in HUB_TASKS or m.prompts_file is not None
    if not needs_template:  # jsonl / embedded: the raw text, one word per label everywhere
        words = list(m.label_words or t.labels)
        data.label_words = [words for _ in data.prompt_languages]
        check_label_words(tok, data.label_words, data.prompt_languages, data.notes)
        if head == "cloze":
            raise ConfigError(
                ["model.head: 'cloze' needs a template with the mask token: set "
                 "model.prompts_file (format: alsace_ds/data/templates/xnli.yaml)"]
            )  # fmt: skip
        return data
    prompts = load_prompts(task_key, data.prompt_languages, path=m.prompts_file)
    check_prompts(task_key, prompts, data.num_labels, need_mask=form == "cloze")
    mask = MASK_TOKENS.get(m.family) or tok.mask_token
    if form == "cloze" and not mask:
        raise ConfigError([f"model {data.model_source}: the tokenizer has no mask token"])
    fields = _fields(FIELDS, task_key, data.unlabeled)

    def render(corpus):
        if corpus is None:
            return None
        return render_corpus(corpus, prompts, fields, mask, form=form)

    data = dataclasses.replace(
        data,
        train=render(data.train),
        unlabeled=render(data.unlabeled),
        dev=render(data.dev),
        test=render(data.test),
    )
    if form == "cloze":
        data.label_words = [list(prompts[x].verbalizer) for x in data.prompt_languages]
        check_label_words(tok, data.label_words, data.prompt_languages, data.notes)
    return data


def _fields(table: dict, task_key: str, corpus: ParallelCorpus) -> tuple[str, ...]:
    got = table[task_key]
    if isinstance(got, dict):  # jsonl: single texts or pairs
        return got["pair" if corpus.is_pair else "single"]
    return tuple(got)


# ----------------------------------------------------------------------------- model source

# A Hub model id: "name" or "owner/name" (anything else that does not exist is a missing folder).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_source(cfg: Config) -> tuple[str, str]:
    """(the config field, its value) of the model the first training stage loads."""
    if cfg.stage0.enabled or cfg.stage0.init_from is None:
        return "model.name_or_path", cfg.model.name_or_path
    return "stage0.init_from", cfg.stage0.init_from


def model_source_problems(cfg: Config) -> list[str]:
    """A local model folder must exist and hold a ``config.json``; a Hub name is checked by
    :func:`check_before_training` (its config is loaded there)."""
    where, source = model_source(cfg)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return []
        return [
            f"{where}: {source} has no config.json, so it is not a Hugging Face model folder "
            "(a run exports its models as <run>/stage0/model and <run>/final/model)"
        ]
    if path.exists():
        return [f"{where}: {source} is a file, not a model folder"]
    if _HUB_ID.match(source):
        return []
    return [f"{where}: no such model folder {source!r}"]


# RoBERTa-type models number positions from pad_token_id + 1 (transformers'
# create_position_ids_from_input_ids), so max_position_embeddings - pad_token_id - 1 tokens fit.
ROBERTA_TYPES = ("xlm-roberta", "xlm-roberta-xl", "roberta", "camembert")


def max_input_tokens(model_config) -> tuple[int, str] | None:
    """The longest input the model's position table takes, and why; None for relative
    positions (T5 / mT5), which have no table to run past."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is None or getattr(model_config, "position_embedding_type", "absolute") != (
        "absolute"
    ):
        return None
    if model_config.model_type in ROBERTA_TYPES:
        offset = int(model_config.pad_token_id) + 1
        return positions - offset, (
            f"max_position_embeddings {positions} minus {offset}: {model_config.model_type} "
            f"position ids start at pad_token_id + 1 = {offset}"
        )
    return positions, f"max_position_embeddings {positions}"


def model_config_problems(cfg: Config, source: str) -> list[str]:
    """Load the model's config (no weights) and check ``model.max_length`` against it."""
    from transformers import AutoConfig

    where, _ = model_source(cfg)
    try:
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"{where}: cannot load the model config of {source!r} ({reason})"]
    limit = max_input_tokens(model_config)
    if limit is not None and cfg.model.max_length > limit[0]:
        return [f"model.max_length: {cfg.model.max_length} tokens is more than the model "
                f"{source} takes: {limit[0]} ({limit[1]}); set model.max_length <= "
                f"{limit[0]}"]  # fmt: skip
    return []


# ----------------------------------------------------------------------------- output directory

#: Space for what a run writes besides models and checkpoints (reports, results, TensorBoard).
MIN_FREE_BYTES = 16 * 2**20


def weights_bytes(source: str) -> int:
    """Size of a local model folder's weight files (0 for a Hub name)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt")
               for f in path.glob(pattern) if f.is_file())  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def output_dir_problems(cfg: Config, weights: int) -> list[str]:
    """``run.output_dir`` must be creatable and writable, on a filesystem with room for at
    least one exported model and one checkpoint's weights per training stage. Nothing is left
    behind: the probe folder is made in the nearest existing folder and removed at once."""
    out = cfg.run.output_dir
    existing = Path(out).expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"run.output_dir: {out} cannot be created: {existing} is a file, not a folder"]
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".alsace-write-check-", dir=existing))
    except OSError as exc:
        return [f"run.output_dir: {out} cannot be written: making a folder in {existing} "
                f"fails ({exc.strerror or exc})"]  # fmt: skip
    stages = int(cfg.stage0.enabled) + int(cfg.distill.enabled)
    need = 2 * weights * stages + MIN_FREE_BYTES
    free = shutil.disk_usage(existing).free
    if free < need:
        return [
            f"run.output_dir: the filesystem of {existing} has {_mib(free)} free, less than the "
            f"{_mib(need)} this run writes at the very least ({stages} training stage(s) x (one "
            f"export + one checkpoint) of {_mib(weights)} of weights, plus "
            f"{_mib(MIN_FREE_BYTES)} of reports; a checkpoint with optimizer state takes about "
            "4x the weights): free some space, or choose another run.output_dir"
        ]
    return []


def selection_rule_problems(cfg: Config) -> list[str]:
    """Rule ``scale`` ranks the task's resolved languages by pre-training size: each needs one
    in the table ``selection.corpus_sizes`` chooses (alsace_ds.data.pretraining)."""
    s = cfg.selection
    if s.teachers is not None or s.rule != "scale":
        return []
    return corpus_size_problems(s.corpus_sizes, cfg.model.family, cfg.task.name, cfg.task.languages)


def check_before_training(cfg: Config, data: TaskData) -> None:
    """The checks that need the model's config or the filesystem, every problem at once, before
    any process group exists or anything is written (called by ``alsace_ds.train.main`` after
    :func:`prepare_task`)."""
    problems = model_config_problems(cfg, data.model_source)
    problems += output_dir_problems(cfg, weights_bytes(data.model_source))
    problems += selection_rule_problems(cfg)
    if problems:
        raise ConfigError(problems, "config")


# ----------------------------------------------------------------------------- entry


def resolved_problems(cfg: Config) -> list[str]:
    """Checks of fields whose meaning depends on the task's resolved languages and labels
    (embedded and Hub tasks fill them only here), and of the model folder."""
    t, m = cfg.task, cfg.model
    problems = teacher_problems(cfg.selection.teachers, t.languages, t.name)
    problems += label_word_problems(m.label_words, t.labels)
    problems += model_source_problems(cfg)
    return problems


def prepare_task(cfg: Config) -> tuple[Config, TaskData]:
    """Resolve files and load + validate every corpus; returns the resolved config too."""
    name = cfg.task.name
    if name == EMBEDDED:
        cfg = _with_embedded(cfg)
    elif name in HUB_TASKS:
        cfg = _with_hub_defaults(cfg)
    t = cfg.task
    problems = resolved_problems(cfg)
    if t.english is not None and t.english not in t.languages:
        problems.insert(0, f"task.english: {t.english!r} is not in task.languages {t.languages}")
    if problems:
        raise ConfigError(problems)
    notes: list[str] = []
    if name in HUB_TASKS:
        train, unlabeled, dev, test = _load_hub(cfg, notes)
    else:
        train, unlabeled, dev, test = _load_files(cfg, name == EMBEDDED)
    if train is not None and t.k_shot is not None:
        if t.k_shot > len(train):
            raise ConfigError(
                [f"task.k_shot: {t.k_shot} is more than the {len(train)} examples of the English "
                 f"training set {train.path}; set task.k_shot <= {len(train)} (or null: all)"]
            )  # fmt: skip
        train = k_shot(train, t.k_shot, cfg.run.seed)
        notes.append(f"stage 0: {t.k_shot}-shot English training set (seed {cfg.run.seed})")
    check_overlaps(cfg, unlabeled, dev, test, train, notes)
    _, source = model_source(cfg)
    data = TaskData(
        languages=list(t.languages),
        english=t.english,
        label_names=list(t.labels),
        label_words=None,
        model_source=str(source),
        train=train,
        unlabeled=unlabeled,
        dev=dev,
        test=test,
        head=cfg.model.resolved_head,
        train_language=train.languages[0] if train is not None else (t.english or "en"),
        notes=notes,
    )
    if data.head != "classification" or name == "xcopa":
        try:
            tok = _load_tokenizer(data.model_source)
        except OSError as exc:
            raise ConfigError(
                [f"model {data.model_source}: cannot load its tokenizer ({exc})"]
            ) from exc
        data = _prompted(cfg, data, tok)
    return cfg, data


__all__ = [
    "DataError",
    "TaskData",
    "cache_dir",
    "check_before_training",
    "find_overlap",
    "parse_split",
    "prepare_task",
]
