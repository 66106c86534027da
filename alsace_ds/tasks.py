"""Resolve the configured task into validated corpora, BEFORE any process group or model.

Every data problem (missing language in a row, empty text, label outside the label set,
unknown language code, ...) surfaces here with the file, row, field and language named,
so a bad input never costs GPU time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from alsace_ds.config import EMBEDDED, Config, ConfigError, resolve_path
from alsace_ds.data import ParallelCorpus, k_shot, load_parallel_jsonl


def cache_dir() -> Path:
    """Where locally built assets live (``ALSACE_CACHE``, default ``~/.cache/alsace_ds``)."""
    return Path(os.environ.get("ALSACE_CACHE", Path.home() / ".cache" / "alsace_ds"))


@dataclass
class TaskData:
    languages: list[str]
    english: str
    label_names: list[str]
    label_words: list[str] | None  # mT5 only
    model_source: str  # folder or Hub name the first stage loads
    train: ParallelCorpus | None  # English, labeled (stage 0)
    unlabeled: ParallelCorpus  # parallel; labels never used
    dev: ParallelCorpus | None  # parallel, labeled (monitoring)
    test: ParallelCorpus  # parallel, labeled (report)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _with_embedded(cfg: Config) -> Config:
    """Fill the task/model fields the user left empty from the embedded task (built here)."""
    from alsace_ds.embedded import build_embedded

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


def prepare_task(cfg: Config) -> tuple[Config, TaskData]:
    """Resolve files and load + validate every corpus; returns the resolved config too."""
    embedded = cfg.task.name == EMBEDDED
    if embedded:
        cfg = _with_embedded(cfg)
    t = cfg.task
    if t.english not in t.languages:
        raise ConfigError([f"task.english: {t.english!r} is not in task.languages {t.languages}"])
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
        if t.k_shot is not None:
            train = k_shot(train, t.k_shot, cfg.run.seed)
    source = cfg.stage0.init_from if not cfg.stage0.enabled else cfg.model.name_or_path
    label_words = None
    if cfg.model.family == "mt5":
        label_words = list(cfg.model.label_words or t.labels)
    data = TaskData(
        languages=list(t.languages),
        english=t.english,
        label_names=list(t.labels),
        label_words=label_words,
        model_source=str(source),
        train=train,
        unlabeled=load(t.unlabeled_file, require_label=False, max_examples=t.max_unlabeled),
        dev=load(t.dev_file, require_label=True),
        test=load(t.test_file, require_label=True),
    )
    return cfg, data
