"""The embedded default task: a small synthetic multilingual PARALLEL task and a tiny model.

Nothing is downloaded: :func:`build_embedded` writes the JSONL files (format:
``alsace_ds.data.corpus``) and a tiny random-init model
(``alsace_ds.models.tiny.build_tiny_model``) in a few seconds, so the
default run works on a fresh machine without network.

Task
====
3-class topic classification (``sports`` / ``politics`` / ``science``). An English sentence has
8-16 words: 3-6 *keywords* drawn from the three classes' keyword lists, the rest *filler* words.
The label is the class with strictly the most keywords; the other classes contribute distractor
keywords (e.g. 3 sports + 2 politics keywords -> ``sports``), so the model must weigh keyword
counts, not just spot one word. A small fraction of labels (``label_noise``, 3%) is replaced by
another class (annotation noise), so even English accuracy stays below 100%.

Languages
=========
``en`` plus six synthetic languages with ISO 639-2 local-use codes ``qaa`` .. ``qaf``. Each
language ``l`` is a deterministic word-by-word "translation" of English: for every group of
English word types (each class's keywords, the filler words) exactly ``round(p_l * n)`` types,
chosen at random per language, map to themselves (shared tokens, like cognates or loanwords) and
the others to an invented, pronounceable word of that language (its own syllable inventory).
Default overlaps ``p_l`` = 0.95, 0.9, 0.85 (``qaa``-``qac``, "high-resource") and 0.5, 0.4, 0.3
(``qad``-``qaf``, "low-resource"). Word order is kept by default (``word_order`` may reverse or
swap adjacent words per language).

Why this shows language-level disparity and lets ALSACE reduce it
-----------------------------------------------------------------
The tiny model is randomly initialised and fine-tuned on English only (stage 0), so it
"understands" exactly the shared word types of a language; its accuracy on a language falls with
``p_l`` -- the disparity. The high-overlap languages stay confident (they become the teachers in
stage 1), and the unlabeled parallel corpus pairs each student-language invented word with its
English (and teacher) context, so cross-lingual self-distillation (stage 2, KL between the
languages' distributions on parallel views, no labels) teaches the students' own words.

Design choices, from measurements (plain PyTorch, one process, xlmr, :data:`RECOMMENDED`):

* The overlaps come in two tiers with a gap, so the vote-based selection is stable: teachers were
  exactly ``en qaa qab qac`` for seeds 0, 1 and 2 (normalised confidence above the mean), students
  ``qad qae qaf``. A smooth ramp (0.9 .. 0.2) put a borderline language on either side.
* The weakest language stays well above chance (about 62-64% vs 96-97% for English). With a
  near-chance weakest language (p = 0.2, about 42%) the students' biased, uncertain predictions
  pulled the teachers with them (gradients flow through both sides) and distillation collapsed to
  a constant prediction after a few epochs.
* Stratified sharing per word group (not a coin flip per word) makes every class equally
  affected in a language and the measured overlap equal to ``p_l``.

Measured (test accuracy %, seeds 0 / 1 / 2; stage 0 then stage 2 with RECOMMENDED["xlmr"]):

=========  ====  ====  ====  ====  ====  ====  ====  =====  =======
           en    qaa   qab   qac   qad   qae   qaf   avg    avg gap
=========  ====  ====  ====  ====  ====  ====  ====  =====  =======
before s0  96.6  94.0  90.4  90.7  71.7  66.8  63.6  81.97  17.07
after  s0  95.1  92.1  90.6  90.1  76.9  72.0  72.9  84.24  12.67
before s1  97.4  94.7  92.8  92.6  73.3  65.8  61.8  82.63  17.23
after  s1  96.9  94.7  92.5  93.0  80.4  74.3  72.7  86.36  12.30
before s2  97.0  93.9  91.5  91.8  73.8  65.7  62.3  82.29  17.17
after  s2  97.0  94.1  92.2  91.3  78.5  74.4  71.8  85.61  13.28
=========  ====  ====  ====  ====  ====  ====  ====  =====  =======

Predictions stay spread over the three classes after distillation (no collapse). Caveat: the
paper-faithful loss (no detach) has a collapse cliff -- with constant lr 1e-4 the model drifted
to one class after roughly 12-20 epochs (20 epochs of linear decay from 1e-4 was still fine for
all seeds, 40 was not; 2e-4 collapsed by epoch 7). ``detach_teacher=True`` did not collapse in
30 epochs at constant 1e-4 and gave more (20 epochs, linear decay from 1e-4: avg +4.8 / +4.2 /
+4.2, gap -6.4 / -8.2 / -7.2). Every language a teacher (the no-selection ablation) gave about
the same as the vote (84.41 / 86.10 / 86.29 avg): on this task the low-resource languages are
uncertain rather than confidently wrong, so selection matters little here.

Files (all under ``root/embedded-<family>-<hash of spec and family>/``)
========================================================================
``train.jsonl``      English labeled rows (``text`` has only ``en``), ``spec.n_train``.
``unlabeled.jsonl``  parallel rows in all 7 languages, NO labels (hidden from the method).
``dev.jsonl``        parallel labeled rows (English dev for stage 0 / monitoring).
``test.jsonl``       parallel labeled rows (per-language accuracy).
``lexicon.json``     the spec, the English word groups and each language's translation table.
``model/``           tiny model + word-level tokenizer (``save_pretrained`` folder).
``assets.json``      the :class:`EmbeddedAssets` paths relative to the folder.

The folder is built in a temporary sibling directory and renamed into place, so every rank of a
multi-process job may call :func:`build_embedded` on the same root at the same time; the result is
deterministic (same spec and family -> byte-identical data files).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

GENERATOR_VERSION = 1

EMBEDDED_LANGUAGES: tuple[str, ...] = ("en", "qaa", "qab", "qac", "qad", "qae", "qaf")
EMBEDDED_LABELS: tuple[str, ...] = ("sports", "politics", "science")

# Each class's English keywords (16 each) and filler words (48). All lowercase ASCII words.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "sports": (
        "match", "goal", "team", "coach", "player", "league", "season", "stadium",
        "referee", "ball", "tournament", "striker", "trophy", "fans", "penalty", "sprint",
    ),
    "politics": (
        "vote", "election", "minister", "party", "senate", "policy", "debate", "campaign",
        "government", "parliament", "tax", "president", "reform", "treaty", "mayor", "ballot",
    ),
    "science": (
        "experiment", "theory", "atom", "cell", "energy", "physics", "research", "molecule",
        "laboratory", "gene", "planet", "telescope", "protein", "chemistry", "particle", "fossil",
    ),
}  # fmt: skip
FILLERS: tuple[str, ...] = (
    "the", "a", "of", "and", "in", "on", "to", "with", "for", "this", "that", "it",
    "was", "is", "at", "by", "from", "after", "before", "today", "yesterday", "people", "said",
    "new", "big", "small", "city", "week", "year", "again", "very", "many", "some", "about",
    "their", "our", "during", "while", "news", "report", "morning", "evening", "local", "first",
    "last", "major", "still", "also",
)  # fmt: skip

WORD_ORDERS = ("same", "reverse", "swap")

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class EmbeddedSpec:
    """Everything that determines the embedded task and model (hashed into the folder name).

    ``overlap[i]`` is the shared-word fraction of ``EMBEDDED_LANGUAGES[i + 1]``;
    ``word_order[i]`` its word order (``same`` | ``reverse`` | ``swap`` adjacent pairs).
    """

    seed: int = 0
    n_train: int = 2000
    n_unlabeled: int = 500
    n_dev: int = 300
    n_test: int = 1000
    overlap: tuple[float, ...] = (0.95, 0.9, 0.85, 0.5, 0.4, 0.3)
    word_order: tuple[str, ...] = ("same",) * 6
    min_words: int = 8
    max_words: int = 16
    min_keywords: int = 3
    max_keywords: int = 6
    label_noise: float = 0.03
    # tiny model (alsace_ds.models.tiny.build_tiny_model)
    model_seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128
    max_length: int = 32

    def validate(self) -> None:
        n_lang = len(EMBEDDED_LANGUAGES) - 1
        if len(self.overlap) != n_lang or not all(0.0 <= p <= 1.0 for p in self.overlap):
            raise ValueError(f"overlap must be {n_lang} fractions in [0, 1], got {self.overlap}")
        if len(self.word_order) != n_lang or any(w not in WORD_ORDERS for w in self.word_order):
            raise ValueError(f"word_order must be {n_lang} of {WORD_ORDERS}, got {self.word_order}")
        if min(self.n_train, self.n_unlabeled, self.n_dev, self.n_test) < 1:
            raise ValueError("every split needs at least one row")
        if not 2 <= self.min_keywords <= self.max_keywords:
            raise ValueError("need 2 <= min_keywords <= max_keywords")
        if not self.max_keywords <= self.min_words <= self.max_words:
            raise ValueError("need max_keywords <= min_words <= max_words")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError("label_noise must be in [0, 0.5)")
        if self.max_words + 2 > self.max_length:
            raise ValueError("max_length must hold max_words + 2 special tokens")


@dataclass
class EmbeddedAssets:
    """Paths (and names) of a built embedded task."""

    root: Path
    train_file: Path
    unlabeled_file: Path
    dev_file: Path
    test_file: Path
    model_dir: Path
    lexicon_file: Path
    family: str
    languages: list[str] = field(default_factory=lambda: list(EMBEDDED_LANGUAGES))
    label_names: list[str] = field(default_factory=lambda: list(EMBEDDED_LABELS))
    label_words: list[str] = field(default_factory=lambda: list(EMBEDDED_LABELS))


RECOMMENDED: dict[str, dict[str, dict[str, float | int | bool | str]]] = {
    "xlmr": {
        # English fine-tuning: en test accuracy 96.6 / 97.4 / 97.0 (seeds 0/1/2), ~15 s on 1 core.
        "stage0": {
            "lr": 1e-3,
            "epochs": 10,
            "batch": 32,
            "warmup_ratio": 0.1,
            "schedule": "linear",
            "weight_decay": 0.01,
            "gradient_clipping": 1.0,
            "dropout": 0.1,
        },
        # Self-distillation (paper-faithful: ordered pairs, KL(P_t1 || P_t2), no detach):
        # avg +2.3 / +3.7 / +3.3 points, avg gap to en -4.4 / -4.9 / -3.9 (seeds 0/1/2).
        "distill": {
            "lr": 1e-4,
            "epochs": 10,
            "batch": 32,
            "warmup_ratio": 0.0,
            "schedule": "linear",
            "weight_decay": 0.0,
            "gradient_clipping": 1.0,
            "dropout": 0.1,
            "detach_teacher": False,
        },
    },
    "mt5": {
        # English fine-tuning: en 92.8 (seed 0), ~25 s on 1 core.
        "stage0": {
            "lr": 1e-3,
            "epochs": 10,
            "batch": 32,
            "warmup_ratio": 0.1,
            "schedule": "linear",
            "weight_decay": 0.01,
            "gradient_clipping": 1.0,
            "dropout": 0.1,
        },
        # Smaller effect than xlmr: avg +0.6, gap -1.3 (seed 0); 1e-4 collapses.
        "distill": {
            "lr": 5e-5,
            "epochs": 10,
            "batch": 32,
            "warmup_ratio": 0.0,
            "schedule": "linear",
            "weight_decay": 0.0,
            "gradient_clipping": 1.0,
            "dropout": 0.1,
            "detach_teacher": False,
        },
    },
}
"""Hyper-parameters measured to work on the default :class:`EmbeddedSpec` (see the module
docstring for the numbers). ``batch`` is the GLOBAL number of examples per optimizer step
(micro_batch x ranks x grad_accum); in ``distill`` each example brings its 7 language views.
``schedule: linear`` = linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0.
AdamW; weight decay not applied to biases / LayerNorm."""


# --------------------------------------------------------------------------------------------
# generator


def _rng(spec: EmbeddedSpec, *parts: object) -> random.Random:
    # random.Random(str) hashes the string with SHA-512: stable across runs and PYTHONHASHSEED.
    return random.Random(":".join(str(p) for p in (spec.seed, *parts)))


def english_groups() -> dict[str, tuple[str, ...]]:
    """The English word-type groups (each class's keywords, then ``filler``)."""
    return {**KEYWORDS, "filler": FILLERS}


def build_lexicon(spec: EmbeddedSpec) -> dict[str, dict[str, str]]:
    """Per non-English language, the English word type -> word table (stratified sharing)."""
    groups = english_groups()
    english = {w for ws in groups.values() for w in ws}
    used = set(english) | set(EMBEDDED_LABELS)
    lexicon: dict[str, dict[str, str]] = {}
    for lang, p in zip(EMBEDDED_LANGUAGES[1:], spec.overlap, strict=True):
        rng = _rng(spec, "lexicon", lang)
        consonants = "".join(sorted(rng.sample(_CONSONANTS, 10)))
        vowels = "".join(sorted(rng.sample(_VOWELS, 3)))
        coda = rng.choice("nlrsk")
        table: dict[str, str] = {}
        for name, words in groups.items():
            n_shared = round(p * len(words))
            shared = set(_rng(spec, "shared", lang, name).sample(list(words), n_shared))
            for w in words:
                if w in shared:
                    table[w] = w
                    continue
                while True:
                    n_syl = rng.choice((2, 2, 3))
                    word = "".join(
                        rng.choice(consonants) + rng.choice(vowels) for _ in range(n_syl)
                    )
                    if rng.random() < 0.3:
                        word += coda
                    if word not in used:
                        break
                used.add(word)
                table[w] = word
        lexicon[lang] = table
    return lexicon


def _count_patterns(k: int) -> list[tuple[int, int, int]]:
    """(label count, distractor a, distractor b) with label count strictly largest, summing to k."""
    out = []
    for c in range(1, k + 1):
        for a in range(0, c):
            b = k - c - a
            if 0 <= b < c:
                out.append((c, a, b))
    return out


def _english_sentence(rng: random.Random, spec: EmbeddedSpec, label: int) -> list[str]:
    k = rng.randint(spec.min_keywords, spec.max_keywords)
    c, a, b = rng.choice(_count_patterns(k))
    others = [i for i in range(len(EMBEDDED_LABELS)) if i != label]
    rng.shuffle(others)
    words: list[str] = []
    for cls, n in ((label, c), (others[0], a), (others[1], b)):
        words += [rng.choice(KEYWORDS[EMBEDDED_LABELS[cls]]) for _ in range(n)]
    n_words = rng.randint(spec.min_words, spec.max_words)
    words += [rng.choice(FILLERS) for _ in range(n_words - len(words))]
    rng.shuffle(words)
    return words


def translate(words: list[str], table: dict[str, str], order: str) -> list[str]:
    """Word-by-word translation with the language's word order."""
    out = [table[w] for w in words]
    if order == "reverse":
        out.reverse()
    elif order == "swap":
        for i in range(0, len(out) - 1, 2):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def generate_splits(spec: EmbeddedSpec) -> dict[str, list[tuple[str, int, list[str]]]]:
    """English rows per split: ``(id, label, words)``; labels balanced, sentences unique."""
    seen: set[tuple[str, ...]] = set()
    splits: dict[str, list[tuple[str, int, list[str]]]] = {}
    sizes = (
        ("train", spec.n_train),
        ("unlabeled", spec.n_unlabeled),
        ("dev", spec.n_dev),
        ("test", spec.n_test),
    )
    for split, n in sizes:
        rng = _rng(spec, "split", split)
        labels = [i % len(EMBEDDED_LABELS) for i in range(n)]
        rng.shuffle(labels)
        rows = []
        for i, label in enumerate(labels):
            while True:
                words = _english_sentence(rng, spec, label)
                if tuple(words) not in seen:
                    break
            seen.add(tuple(words))
            if rng.random() < spec.label_noise:  # annotation noise: keeps accuracy below 100%
                label = (label + rng.randint(1, len(EMBEDDED_LABELS) - 1)) % len(EMBEDDED_LABELS)
            rows.append((f"{split}-{i + 1:05d}", label, words))
        splits[split] = rows
    return splits


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_data(out: Path, spec: EmbeddedSpec) -> list[str]:
    """Write the four JSONL files and lexicon.json into ``out``; returns the full vocabulary."""
    lexicon = build_lexicon(spec)
    orders = dict(zip(EMBEDDED_LANGUAGES[1:], spec.word_order, strict=True))
    splits = generate_splits(spec)
    for split, rows in splits.items():
        records = []
        for ex_id, label, words in rows:
            text = {"en": " ".join(words)}
            if split != "train":
                for lang, table in lexicon.items():
                    text[lang] = " ".join(translate(words, table, orders[lang]))
            record: dict = {"id": ex_id}
            if split != "unlabeled":
                record["label"] = label
            record["text"] = text
            records.append(record)
        _write_jsonl(out / f"{split}.jsonl", records)
    with open(out / "lexicon.json", "w", encoding="utf-8", newline="\n") as fh:
        json.dump(
            {
                "generator_version": GENERATOR_VERSION,
                "spec": asdict(spec),
                "languages": list(EMBEDDED_LANGUAGES),
                "label_names": list(EMBEDDED_LABELS),
                "groups": {k: list(v) for k, v in english_groups().items()},
                "lexicon": lexicon,
            },
            fh,
            ensure_ascii=False,
            indent=1,
            sort_keys=True,
        )
        fh.write("\n")
    vocab = {w for ws in english_groups().values() for w in ws}
    for table in lexicon.values():
        vocab.update(table.values())
    return sorted(vocab)


# --------------------------------------------------------------------------------------------
# public entry point


def spec_hash(spec: EmbeddedSpec, family: str) -> str:
    blob = json.dumps(
        {"version": GENERATOR_VERSION, "family": family, "spec": asdict(spec)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _assets(folder: Path, family: str) -> EmbeddedAssets:
    return EmbeddedAssets(
        root=folder,
        train_file=folder / "train.jsonl",
        unlabeled_file=folder / "unlabeled.jsonl",
        dev_file=folder / "dev.jsonl",
        test_file=folder / "test.jsonl",
        model_dir=folder / "model",
        lexicon_file=folder / "lexicon.json",
        family=family,
    )


def build_embedded(
    root: str | os.PathLike, family: str = "xlmr", spec: EmbeddedSpec = EmbeddedSpec()
) -> EmbeddedAssets:
    """Build (or reuse) the embedded task and tiny model under ``root``; returns the paths.

    Race-safe and idempotent: the folder ``root/embedded-<family>-<hash>`` is built in a
    temporary sibling directory and renamed into place; a caller that finds it already there (or
    loses the rename race) reuses it.
    """
    from alsace_ds.models.families import FAMILIES
    from alsace_ds.models.tiny import build_tiny_model

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    spec.validate()
    root = Path(root)
    folder = root / f"embedded-{family}-{spec_hash(spec, family)}"
    if (folder / "assets.json").is_file():
        return _assets(folder, family)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        vocab = _write_data(tmp, spec)
        build_tiny_model(
            tmp / "model",
            family,
            vocab,
            list(EMBEDDED_LABELS),
            label_words=list(EMBEDDED_LABELS),
            seed=spec.model_seed,
            hidden=spec.hidden,
            layers=spec.layers,
            heads=spec.heads,
            ffn=spec.ffn,
            max_length=spec.max_length,
        )
        assets = _assets(tmp, family)
        rel = {
            k: str(Path(v).relative_to(tmp))
            for k, v in asdict(assets).items()
            if isinstance(v, Path) and k != "root"
        }
        with open(tmp / "assets.json", "w", encoding="utf-8", newline="\n") as fh:
            json.dump({"family": family, "paths": rel, "spec": asdict(spec)}, fh, indent=1)
            fh.write("\n")
        for d in (tmp, tmp / "model"):
            os.chmod(d, 0o755)  # mkdtemp makes 0700 folders; other users/ranks may read them
        try:
            os.rename(tmp, folder)
        except OSError:
            # Lost the race: rename onto an existing non-empty directory fails; reuse the winner's.
            if not (folder / "assets.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _assets(folder, family)
