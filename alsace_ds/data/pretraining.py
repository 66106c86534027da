"""How much pre-training text a model saw per language: the tables of ``selection.rule: scale``
(the paper's Table 3 "scale-based selection": teachers = the languages with the most
pre-training data).

Sources (one table per pre-training corpus; a language missing from a table is left out, not
guessed):

``cc100``  XLM-R's CC-100: Conneau et al. 2020, "Unsupervised Cross-lingual Representation
           Learning at Scale" (ACL 2020, arXiv:1911.02116), Appendix A, Table 6 "Languages and
           statistics of the CC-100 corpus": the **tokens column, in millions**. Transcribed from
           ``cc-100/cc-100.csv`` of github.com/mayhewsw/multilingual-data-stats (which also
           gives the table's size column, GiB, not used here). Used for the ``xlmr`` family and
           for multilingual-e5 (built on XLM-R's vocabulary and run here as ``xlmr``). Notes:
           the paper's table has two Chinese rows; ``zh`` is Simplified (259), ``zh-Hant`` is
           Traditional (176). Its two Burmese rows (56 and 15) do not say which one is Zawgyi,
           so Burmese is left out, as are the five romanized rows. Zh, ja and th are unsegmented
           scripts, so their token counts are small next to their size in GiB (zh 46.9, ja
           69.3, th 71.7 GiB); the ranking follows the paper's tokens all the same.
``mc4``    mT5's mC4: Xue et al. 2021, "mT5: A Massively Multilingual Pre-trained Text-to-Text
           Transformer" (NAACL 2021, arXiv:2010.11934), appendix table of mC4 statistics per
           language: the **tokens column, in billions**. Transcribed from ``mc4/mc4.csv`` of
           github.com/mayhewsw/multilingual-data-stats (its README calls it the paper's
           Table 5). mC4 writes Hebrew ``iw`` (cld3's code); here it is ``he``; the ``-Latn``
           (romanized) and ``und`` rows are left out. Used for the ``mt5`` family.
``embedded`` SYNTHETIC, for the embedded task (:mod:`alsace_ds.data.embedded`), which has no
           pre-training data at all: ``en`` = 1.0 and each synthetic language its shared-word
           overlap ``p_l`` with English from the generator's default spec (0.95 0.9 0.85 0.5 0.4
           0.3 for ``qaa``..``qaf``), i.e. the share of a language that the tiny model, trained on
           English only, "knows". Derived from :class:`~alsace_ds.data.embedded.EmbeddedSpec`,
           not measured.

Which table (``selection.corpus_sizes``): ``auto`` = ``embedded`` for the embedded task, else by
``model.family`` (:data:`FAMILY_TABLES`); or a table's name; or a path to a JSON file
``{"language code": size, ...}`` (any positive numbers in one unit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alsace_ds.config import resolve_path
from alsace_ds.data.embedded import EMBEDDED_LANGUAGES, EmbeddedSpec

# Conneau et al. 2020, Table 6: tokens (millions) per language of CC-100.
CC100_TOKENS_M: dict[str, float] = {
    "en": 55608, "vi": 24757, "ru": 23408, "id": 22704, "fa": 13259, "sv": 12950, "ro": 10354,
    "de": 10297, "fr": 9780, "es": 9374, "no": 8494, "pt": 8405, "da": 7823, "hu": 7807,
    "uk": 6960, "fi": 6730, "pl": 6490, "ko": 5644, "bg": 5487, "nl": 5025, "it": 4983,
    "el": 4285, "sk": 3525, "he": 3399, "hr": 3297, "ar": 2869, "tr": 2736, "cs": 2498,
    "lt": 1835, "th": 1834, "ca": 1752, "hi": 1715, "sl": 1669, "ms": 1318, "lv": 1198,
    "sq": 918, "et": 843, "sr": 843, "az": 783, "ur": 730, "ta": 595, "tl": 556, "ja": 530,
    "bn": 525, "is": 505, "gl": 495, "kk": 476, "ka": 469, "mk": 449, "hy": 421, "la": 390,
    "be": 362, "ml": 313, "sw": 275, "eu": 270, "zh": 259, "te": 249, "mn": 248, "si": 243,
    "af": 242, "ne": 237, "zh-Hant": 176, "mr": 175, "kn": 169, "eo": 157, "cy": 141,
    "gu": 140, "ps": 96, "ky": 94, "uz": 91, "ga": 86, "am": 68, "pa": 68, "ku": 66, "so": 62,
    "ha": 56, "sd": 50, "km": 36, "or": 36, "yi": 34, "fy": 29, "ug": 27, "mg": 25, "jv": 24,
    "gd": 21, "lo": 17, "sa": 17, "br": 16, "bs": 14, "xh": 13, "su": 10, "om": 8, "as": 5,
}  # fmt: skip

# Xue et al. 2021, mC4 statistics: tokens (billions) per language.
MC4_TOKENS_B: dict[str, float] = {
    "en": 2733, "ru": 713, "es": 433, "de": 347, "fr": 318, "ja": 164, "it": 162, "pt": 146,
    "pl": 130, "vi": 116, "nl": 73, "tr": 71, "id": 69, "cs": 63, "ar": 57, "fa": 52, "ro": 52,
    "sv": 45, "el": 43, "uk": 41, "zh": 39, "hu": 39, "da": 29, "no": 27, "ko": 26, "fi": 25,
    "hi": 24, "bg": 22, "sk": 18, "he": 17, "mr": 14, "ca": 13, "ms": 13, "th": 11, "lt": 11,
    "sl": 8.8, "bn": 7.3, "lv": 7, "et": 6.9, "mt": 5.2, "cy": 4.9, "az": 4.4, "sr": 4.3,
    "sq": 4, "ta": 3.4, "ne": 3.2, "kk": 3.1, "ml": 2.7, "is": 2.6, "ka": 2.5, "gl": 2.4,
    "hy": 2.4, "ur": 2.4, "fil": 2.1, "be": 2, "mk": 1.8, "mn": 1.8, "af": 1.7, "sd": 1.6,
    "eu": 1.4, "tg": 1.4, "so": 1.4, "la": 1.3, "te": 1.3, "kn": 1.1, "lb": 1, "ky": 1, "sw": 1,
    "my": 0.9, "uz": 0.9, "gu": 0.8, "si": 0.8, "eo": 0.7, "km": 0.6, "pa": 0.6, "ga": 0.5,
    "fy": 0.4, "ps": 0.4, "gd": 0.4, "ku": 0.4, "jv": 0.3, "am": 0.3, "yi": 0.3, "zu": 0.2,
    "co": 0.2, "ceb": 0.2, "mg": 0.2, "sn": 0.2, "hmn": 0.2, "ht": 0.2, "ha": 0.2, "su": 0.1,
    "ny": 0.1, "lo": 0.1, "mi": 0.1, "sm": 0.09, "ig": 0.09, "haw": 0.09, "st": 0.08,
    "xh": 0.06, "yo": 0.05,
}  # fmt: skip


def embedded_sizes(spec: EmbeddedSpec | None = None) -> dict[str, float]:
    """The synthetic table: ``en`` 1.0, each other language its shared-word overlap."""
    spec = spec or EmbeddedSpec()
    return {
        EMBEDDED_LANGUAGES[0]: 1.0,
        **dict(zip(EMBEDDED_LANGUAGES[1:], spec.overlap, strict=True)),
    }


TABLES: dict[str, dict[str, float]] = {
    "cc100": {k: float(v) for k, v in CC100_TOKENS_M.items()},
    "mc4": {k: float(v) for k, v in MC4_TOKENS_B.items()},
    "embedded": embedded_sizes(),
}
UNITS = {"cc100": "million tokens", "mc4": "billion tokens", "embedded": "synthetic"}
# model.family -> its pre-training corpus ("e5": multilingual-e5, XLM-R based; run as xlmr here)
FAMILY_TABLES = {"xlmr": "cc100", "e5": "cc100", "mt5": "mc4"}
FIELD = "selection.corpus_sizes"


class CorpusSizeError(ValueError):
    """A ``selection.corpus_sizes`` that names no table and no readable JSON file."""


def table_name(corpus_sizes: str, family: str, task_name: str) -> str:
    """The table ``corpus_sizes`` means: a name of :data:`TABLES`, or the path as given."""
    if corpus_sizes != "auto":
        return corpus_sizes
    if task_name == "embedded":
        return "embedded"
    if family not in FAMILY_TABLES:
        raise CorpusSizeError(
            f"{FIELD}: auto knows no table for model.family {family!r} (known: "
            f"{', '.join(FAMILY_TABLES)}); name one of {list(TABLES)} or a JSON file"
        )
    return FAMILY_TABLES[family]


def read_sizes_file(path: Path) -> dict[str, float]:
    """``{language code: positive size}`` from a JSON file; :class:`CorpusSizeError` otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusSizeError(
            f"{FIELD}: {str(path)!r} is no table name ({', '.join(['auto', *TABLES])}) and no "
            "such file"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusSizeError(f"{FIELD}: cannot read {str(path)!r} as JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise CorpusSizeError(
            f"{FIELD}: {str(path)!r} must hold a non-empty JSON object "
            '{"language code": size, ...}'
        )
    bad = [
        k for k, v in data.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
    ]  # fmt: skip
    if bad:
        raise CorpusSizeError(
            f"{FIELD}: {str(path)!r}: the size of {', '.join(map(repr, bad))} is not a "
            "positive number"
        )
    return {str(k): float(v) for k, v in data.items()}


def load_sizes(corpus_sizes: str, family: str, task_name: str) -> tuple[str, dict[str, float]]:
    """``(table name or file path, {language: size})`` for ``selection.corpus_sizes``."""
    name = table_name(corpus_sizes, family, task_name)
    if name in TABLES:
        return name, dict(TABLES[name])
    return name, read_sizes_file(resolve_path(name))


def corpus_size_problems(
    corpus_sizes: str, family: str, task_name: str, languages: list[str]
) -> list[str]:
    """Every task language needs a size in the chosen table (checked before any training)."""
    try:
        name, sizes = load_sizes(corpus_sizes, family, task_name)
    except CorpusSizeError as exc:
        return [str(exc)]
    missing = [x for x in languages if x not in sizes]
    if not missing:
        return []
    return [
        f"{FIELD}: the table {name!r} (chosen by {FIELD}={corpus_sizes!r}) has no size for the "
        f"task language(s) {', '.join(missing)}; give a JSON file {{language: size}} that "
        "covers every task language"
    ]
