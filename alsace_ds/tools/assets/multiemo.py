"""MultiEmo review sentences as an aligned parallel corpus (11 languages, 4 labels).

Source
======
MultiEmo (Kocon et al., 2021; sentiment of Polish customer reviews, machine-translated into
10 languages) as packaged by BIG-bench: the source distribution ``bigbench==1.0.0``
(``bigbench-1.0.0.tar.gz``, 358 MB, sha256 pinned below). **PyPI no longer serves it** (only
bigbench 0.0.1 is left, 2026): the build reads a copy you have (``--sdist PATH``, or the file
in ``<cache>/downloads``), tries ``pip download`` otherwise, and says in one line that the
source is gone when the index does not list it (:func:`fetch_sdist`). Only the members
``bigbench/benchmark_tasks/multiemo/<domain>_sentence_<lang>/task.json`` of one domain are read,
streamed out of the archive (it is never unpacked). Domains (``--domain``, :data:`DOMAINS`):
``hotels`` (the default), ``medicine``, ``products``, ``reviews`` (MultiEmo's four review
sources; ``reviews`` holds MultiEmo's school/university reviews, judging by its sentences) and
``all`` (BIG-bench's union of the four); each has the same 11 languages and 4 labels (English
sentences: hotels 24,851, medicine 22,657, products 7,427, reviews 2,531, all 57,466 = their
sum). Each is a BIG-bench JSON task whose ``examples`` are
``{"input": sentence, "target_scores": {"negative": 1, "neutral": 0, "positive": 0,
"ambivalent": 0}}`` (a ``"target"`` string is accepted too); the files are parallel row by row:
row ``i`` of every language translates the same Polish sentence, in the same order. Labels
(index order): ``negative neutral positive ambivalent``. Languages: ``en de es fr it ja nl pl pt
ru zh`` (``pl`` is the original language, English is the reference here).

::

    python -m alsace_ds.tools.assets.multiemo --out ~/.cache/alsace_ds/multiemo \
        --sdist ~/bigbench-1.0.0.tar.gz
    python -m alsace_ds.tools.assets.multiemo --domain products --out ~/.cache/alsace_ds/me-p

Alignment check (:func:`align_to_reference`)
============================================
Every language is checked against English row by row. Labels are the signal (a translation
keeps its label; a misaligned row agrees only by chance, about 30% of rows).

1. Walk both files with a current shift ``d`` (English row ``k`` <-> row ``k + d``, start 0).
   Equal labels: a pair. A mismatch followed by a window of ``WINDOW`` rows that agree (at most
   ``TOL`` mismatches) is an isolated disagreement: that row is dropped (``label_mismatch``).
2. Otherwise the language has drifted. Every shift ``d1`` within ``MAX_SHIFT`` of ``d`` is tried
   on a window past the possible gap; one with at most ``TOL`` mismatches realigns the file.
   The drift does not begin at the first mismatch (drifted rows agree by chance, e.g. inside a
   run of equal labels): every boundary up to ``LOOKBACK`` rows back is scored by its label
   mismatches, ties by a translation cost (robust z of the length ratio + the number of digits
   and punctuation marks that differ). The best boundary is reported; since labels cannot tell
   the tied boundaries apart, every row whose pairing depends on the choice is dropped
   (``ambiguous_alignment``). English rows left without a counterpart (``d1 < d``: the
   language lost rows) are dropped (``no_counterpart``); rows the language has in excess
   (``d1 > d``) are skipped (``extra_rows``). Pairing continues at ``d1``, every label checked.
3. No shift realigns: rows are dropped (``unaligned``) up to the first window where some shift
   agrees again (or to the end).

Then a pair is dropped when the translation is empty (``empty_text``), has control characters
(``control_chars``), has no single gold label (``no_label``), or its length ratio is an outlier
(``length_outlier``: robust z of ``log((len_x + 5) / (len_en + 5))`` above ``MAX_LENGTH_Z`` = 8,
i.e. a broken translation such as ``"!"`` for a 200-character sentence, or a repetition loop).
A row enters the parallel corpus only when EVERY language keeps it, so a kept row has the same
label in all 11 languages. Finally English duplicates (same text up to case and spaces) keep
their first row only (``duplicate_text``), so no sentence is in two splits.

Findings on bigbench 1.0.0, hotels domain (``alignment.json`` lists every dropped row, by language
and reason; the other domains' reports are in their own ``alignment.json``):

- ``de`` has 24,850 rows for English's 24,851. English row 22,362 ("We spent two pleasant days
  here.") has no German translation; German labels disagree from row 22,364 on; the shift -1
  realigns all 2,486 rows after the boundary with 0 label mismatches. Rows 22,360-22,364 are
  equal-label candidates for the boundary, so 22,360, 22,361, 22,363 and 22,364 are dropped too.
- The other 9 languages are aligned throughout (0 label mismatches).
- Per language (besides English row 7,583, empty in English): ``zh`` 197 empty translations + 44
  length outliers, ``ja`` 4 empty + 15 outliers, ``es``/``pt`` 2, ``pl`` 3, ``it``/``nl`` 1
  outliers, ``fr`` 1 outlier + 1 translation made of NUL characters; 61 English duplicates.
- 24,575 rows are kept in all 11 languages (24,515 after English de-duplication).

Output (:func:`build_multiemo`)
===============================
Parallel JSONL (:mod:`alsace_ds.data.corpus`): ``{"id": "hotels-22362", "label": 2, "text": {"en":
..., "de": ..., ...}}`` with the label index and the domain and English row number in the id.

- ``train_en.jsonl``: English only, labeled (stage 0), default 2,000 rows;
- ``unlabeled.jsonl``: parallel (labels written, never used), default 500;
- ``dev.jsonl``: parallel, labeled, default 200;
- ``test.jsonl``: parallel, labeled, default 1,000;
- ``alignment.json``: the report above, plus the label counts of each split.

The parallel slices are drawn from the kept parallel rows, the English training rows from all
other usable English rows, by a ``random.Random(seed)`` shuffle: disjoint by id and by English
text, deterministic. The folder is built atomically and reused when complete (same arguments;
other arguments on a complete folder are an error). Timing here: reading the 11 members out of
the 358 MB archive about 5-8 s, checking and writing about 4 s.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import tarfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alsace_ds.io import sha256_file
from alsace_ds.tools.assets import (
    AssetError,
    build_folder,
    check_sha256,
    downloads_dir,
    pip_download,
    read_marker,
    write_json,
)

PROJECT, VERSION = "bigbench", "1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# The sentence-level domains of bigbench's multiemo (members ``<domain>_sentence_<lang>``);
# "all" is BIG-bench's union of the four.
DOMAINS = ("hotels", "medicine", "products", "reviews", "all")
DEFAULT_DOMAIN = "hotels"


def member_re(domain: str = DEFAULT_DOMAIN) -> re.Pattern:
    """The archive members of one domain: ``.../multiemo/<domain>_sentence_<lang>/task.json``."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {list(DOMAINS)}, got {domain!r}")
    return re.compile(
        rf"(?:^|/)bigbench/benchmark_tasks/multiemo/{domain}_sentence_([a-z]+)/task\.json$"
    )


MEMBER_RE = member_re()
REFERENCE = "en"
LABEL_NAMES = ["negative", "neutral", "positive", "ambivalent"]
EXTRACTOR_VERSION = 1

# alignment parameters (module docstring)
WINDOW = 30
TOL = 2
MAX_SHIFT = 20
LOOKBACK = 100
MAX_LENGTH_Z = 8.0
_LEN_SMOOTH = 5  # characters added to both lengths of a ratio (short sentences)
_MIN_MAD = 0.05  # floor of the log-ratio MAD (a near-constant ratio makes z explode)


# ----------------------------------------------------------------------------- source


GONE = (
    "bigbench {version} is no longer on the package index ({listed}), so MultiEmo cannot be "
    "built from it; if you have a copy of {name} (sha256 {sha}), pass --sdist PATH "
    "(python -m alsace_ds.tools.assets.multiemo or python -m alsace_ds.tools.real) or put it in "
    "{folder}"
)


def _pip_download(dest: Path) -> None:
    """``pip download`` the pinned sdist into ``dest`` (the index pip is configured with);
    one-line :class:`AssetError` when the index no longer lists it (bigbench 1.0.0 was
    removed from PyPI in 2026; only 0.0.1 is left) or pip refuses it."""
    res = pip_download(f"{PROJECT}=={VERSION}", dest, binary=False)
    if (dest / SDIST_NAME).is_file():
        return
    err = res.stderr + res.stdout
    listed = re.search(r"\(from versions: ([^)]*)\)", err)
    if listed is not None or "No matching distribution" in err:
        versions = listed.group(1).strip() if listed is not None else ""
        raise AssetError(
            GONE.format(
                version=VERSION,
                listed=f"it lists {versions}" if versions and versions != "none" else "none listed",
                name=SDIST_NAME, sha=SDIST_SHA256, folder=dest,
            )
        )  # fmt: skip
    last = next((x.strip() for x in reversed(err.splitlines()) if x.strip()), "no output")
    # pip >= 26 downloads this sdist, then refuses it while preparing its metadata (its
    # setup.py declares a direct URL dependency, bleurt): only the archive is needed here.
    raise AssetError(
        f"pip download {PROJECT}=={VERSION} left no {SDIST_NAME} (pip: {last}); download the "
        f"file by other means and pass --sdist PATH, or put it in {dest}"
    )


def fetch_sdist(sdist_dir: Path | None = None, sdist: Path | None = None) -> Path:
    """The pinned ``bigbench-1.0.0.tar.gz``, sha256-checked: ``sdist`` (a file the user
    has), else ``sdist_dir / bigbench-1.0.0.tar.gz`` (default ``<cache>/downloads``), else
    fetched there with ``pip download``. A source that is gone is a one-line
    :class:`AssetError` saying so and how to build from a local copy (:data:`GONE`)."""
    if sdist is not None:
        path = Path(sdist).expanduser()
        if not path.is_file():
            raise AssetError(f"--sdist {path}: no such file")
        if (got := sha256_file(path)) != SDIST_SHA256:
            raise AssetError(f"--sdist {path}: sha256 {got} is not {SDIST_NAME}'s {SDIST_SHA256}")
        return path
    sdist_dir = Path(sdist_dir) if sdist_dir is not None else downloads_dir()
    path = sdist_dir / SDIST_NAME
    if not path.is_file():
        _pip_download(sdist_dir)
    check_sha256(path, SDIST_SHA256)
    return path


def read_task_files(archive: Path, domain: str = DEFAULT_DOMAIN) -> dict[str, tuple[str, bytes]]:
    """Stream the ``<domain>_sentence_<lang>/task.json`` members out of the archive:
    ``{lang: (member name, bytes)}`` (nothing is written to disk)."""
    found: dict[str, tuple[str, bytes]] = {}
    pattern = member_re(domain)
    with tarfile.open(archive, "r|gz") as tf:
        for member in tf:
            m = pattern.search(member.name)
            if m and member.isfile():
                fh = tf.extractfile(member)
                assert fh is not None
                found[m.group(1)] = (member.name, fh.read())
    if REFERENCE not in found:
        raise AssetError(f"{archive.name} has no multiemo {domain}_sentence_{REFERENCE}/task.json")
    return found


@dataclass
class Rows:
    texts: list[str]
    labels: list[int | None]  # None: no single gold label


def parse_task(raw: bytes, label_names: list[str], where: str) -> Rows:
    """Texts and label indices of a BIG-bench task.json (``target_scores`` or ``target``)."""
    task = json.loads(raw)
    index = {n: i for i, n in enumerate(label_names)}
    texts, labels = [], []
    for n, ex in enumerate(task.get("examples", [])):
        if "target_scores" in ex:
            scores = ex["target_scores"]
            if set(scores) - set(index):
                raise AssetError(f"{where} example {n}: unknown labels {sorted(scores)}")
            top = max(scores.values()) if scores else None
            gold = [k for k, v in scores.items() if v == top]
            label = index[gold[0]] if len(gold) == 1 else None
        else:
            target = ex.get("target")
            target = target[0] if isinstance(target, list) and len(target) == 1 else target
            label = index.get(target) if isinstance(target, str) else None
        texts.append(str(ex.get("input", "")).strip())
        labels.append(label)
    return Rows(texts, labels)


# ----------------------------------------------------------------------------- alignment

_PUNCT = set('0123456789,.!?-():;"%')
_PUNCT_MAP = str.maketrans(
    {"。": ".", "、": ",", "–": "-", "—": "-"} | {q: '"' for q in "「」『』“”„«»"}
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def _log_ratio(len_ref: int, len_x: int) -> float:
    return math.log((len_x + _LEN_SMOOTH) / (len_ref + _LEN_SMOOTH))


def _signature(text: str) -> Counter:
    """Digits and punctuation of a sentence (translations keep them; NFKC + CJK marks)."""
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT_MAP)
    return Counter(c for c in text if c in _PUNCT)


def _robust(values: list[float]) -> tuple[float, float]:
    """Median and robust scale (1.4826 MAD, floored) of ``values``."""
    if not values:
        return 0.0, 1.0
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    return med, max(1.4826 * mad, _MIN_MAD)


@dataclass
class Alignment:
    pair: list[int | None]  # English row -> row of the language (None: dropped, see below)
    events: list[dict] = field(default_factory=list)
    no_counterpart: list[int] = field(default_factory=list)  # English rows the language lacks
    ambiguous: list[int] = field(default_factory=list)  # English rows near a drift boundary
    unaligned: list[int] = field(default_factory=list)  # English rows no shift realigns
    extra_rows: list[int] = field(default_factory=list)  # rows of the language left unpaired


class _Pairs:
    """Label equality and a mismatch cost between English rows and rows of one language."""

    def __init__(self, ref: Rows, x: Rows):
        self.ref, self.x = ref, x
        self.n, self.m = len(ref.labels), len(x.labels)
        ratios = [
            _log_ratio(len(ref.texts[k]), len(x.texts[k]))
            for k in range(min(self.n, self.m))
            if ref.texts[k] and x.texts[k] and ref.labels[k] == x.labels[k]
        ]
        self.med, self.scale = _robust(ratios)
        self._sig: dict[tuple[int, int], Counter] = {}

    def same(self, k: int, j: int) -> bool:
        lab = self.ref.labels[k]
        return 0 <= j < self.m and lab is not None and lab == self.x.labels[j]

    def bad_in(self, start: int, off: int, size: int) -> tuple[int, int]:
        """(label mismatches, rows) on English rows [start, start + size) at shift ``off``."""
        ks = range(max(0, start), min(self.n, start + size))
        return sum(not self.same(k, k + off) for k in ks), len(ks)

    def sig(self, side: int, k: int) -> Counter:
        key = (side, k)
        if key not in self._sig:
            self._sig[key] = _signature((self.ref, self.x)[side].texts[k])
        return self._sig[key]

    def cost(self, k: int, j: int) -> float:
        """How unlike a translation row ``j`` is of English row ``k``: the length ratio's
        robust z plus the number of digits / punctuation marks that differ."""
        if not 0 <= j < self.m:
            return 10.0
        z = abs(_log_ratio(len(self.ref.texts[k]), len(self.x.texts[j])) - self.med) / self.scale
        a, b = self.sig(0, k), self.sig(1, j)
        return z + sum(abs(a[c] - b[c]) for c in a.keys() | b.keys())


def align_to_reference(
    ref: Rows,
    x: Rows,
    *,
    window: int = WINDOW,
    tol: int = TOL,
    max_shift: int = MAX_SHIFT,
    lookback: int = LOOKBACK,
) -> Alignment:
    """Pair the rows of ``x`` with the English rows ``ref`` (module docstring, steps 1-3)."""
    P = _Pairs(ref, x)
    n, m = P.n, P.m
    out = Alignment(pair=[None] * n)
    i, d, seg = 0, 0, 0  # English row i <-> row i + d; seg: where the current shift began
    while i < n:
        j = i + d
        if j >= m:
            out.no_counterpart.extend(range(i, n))
            out.events.append({"kind": "ended", "at_row": i, "rows": [i, n - 1]})
            break
        if P.same(i, j) or P.bad_in(i + 1, d, window)[0] <= tol:
            out.pair[i] = j  # a pair, or an isolated disagreement (the label check drops it)
            i += 1
            continue
        # drift: the shift that realigns, tried on a window past any gap
        probe = i + max_shift if i + max_shift + window <= n else max(i + 1, n - window)
        best = None
        for d1 in range(d - max_shift, d + max_shift + 1):
            bad, size = P.bad_in(probe, d1, window)
            if d1 != d and size >= min(window, 5) and bad <= tol:
                key = (bad, abs(d1 - d), d1)
                best = key if best is None or key < best else best
        if best is None:
            resync = _resync(P, i, d, window, tol, max_shift)
            stop = resync[0] if resync else n
            out.unaligned.extend(range(i, stop))
            out.events.append({"kind": "unaligned", "at_row": i, "rows": [i, stop - 1]})
            if resync is None:
                break
            (i, d), seg = resync, resync[0]
            continue
        d1 = best[2]
        gap = max(0, d - d1)
        b, lo, hi = _boundary(P, i, d, d1, max(seg, i - lookback), max_shift + window)
        # English rows [b, b + gap) have no counterpart; where b lies is certain only up to
        # [lo, hi]: every row whose pairing depends on it is dropped as ambiguous
        uncertain = [k for k in range(lo, min(n, hi + gap)) if not b <= k < b + gap]
        event = {
            "kind": "missing_rows" if d1 < d else "extra_rows",
            "at_row": b,
            "first_mismatch_row": i,
            "shift_before": d,
            "shift_after": d1,
            "ambiguous_rows": uncertain,
        }
        for k in range(lo, n):
            out.pair[k] = None
        if d1 < d:
            event["rows"] = list(range(b, b + gap))
            out.no_counterpart.extend(event["rows"])
        else:  # the language's rows [b + d, b + d1) have no English counterpart
            event["extra_rows"] = list(range(b + d, b + d1))
            out.extra_rows.extend(event["extra_rows"])
        out.ambiguous.extend(uncertain)
        for k in range(lo, b):
            out.pair[k] = k + d  # (dropped as ambiguous, kept for the report)
        out.events.append(event)
        i, d = max(b + gap, min(n, hi + gap)), d1
        seg = i
    # how well each realignment holds: label mismatches on the rows it pairs
    for e, ev in enumerate(out.events):
        if ev["kind"] in ("missing_rows", "extra_rows"):
            start = ev["at_row"] + len(ev.get("rows", []))
            stop = out.events[e + 1]["at_row"] if e + 1 < len(out.events) else n
            ks = [k for k in range(start, stop) if out.pair[k] is not None]
            ev["rows_after"] = len(ks)
            ev["label_mismatches_after"] = sum(not P.same(k, out.pair[k]) for k in ks)
    return out


def _resync(P: _Pairs, i: int, d: int, window: int, tol: int, max_shift: int):
    """First (row, shift) at or after ``i + window`` where a window matches again, or None."""
    shifts = sorted(range(d - 2 * max_shift, d + 2 * max_shift + 1), key=lambda s: abs(s - d))
    for p in range(i + window, P.n - window + 1, max(1, window // 2)):
        for d1 in shifts:
            if P.bad_in(p, d1, window)[0] <= tol:
                return p, d1
    return None


def _boundary(P: _Pairs, i: int, d: int, d1: int, lo: int, ahead: int) -> tuple[int, int, int]:
    """Where the shift changes from ``d`` to ``d1`` around the first mismatch ``i``.

    Every English row ``b`` in ``[lo, i + ahead // 2]`` is scored on the rows ``[lo, i +
    ahead)``: rows before ``b`` at shift ``d``, the ``max(0, d - d1)`` rows from ``b`` dropped,
    the rest at ``d1``. Fewest label mismatches first, then the smallest :meth:`_Pairs.cost`.
    Returns ``(best b, first and last b with the fewest label mismatches)``.
    """
    hi = min(P.n, i + ahead)
    gap = max(0, d - d1)
    scored = []
    for b in range(lo, min(P.n, i + ahead // 2) + 1):
        bad, cost = 0, 0.0
        for k in range(lo, hi):
            if b <= k < b + gap:
                continue
            j = k + (d if k < b else d1)
            bad += not P.same(k, j)
            cost += P.cost(k, j)
        scored.append((bad, cost, b))
    fewest = min(s[0] for s in scored)
    tied = [s for s in scored if s[0] == fewest]
    return min(tied)[2], min(s[2] for s in tied), max(s[2] for s in tied)


# ----------------------------------------------------------------------------- checks


def _text_problem(text: str) -> str | None:
    if not text:
        return "empty_text"
    if _CONTROL.search(text):
        return "control_chars"
    return None


REASONS = (
    "no_counterpart",
    "ambiguous_alignment",
    "unaligned",
    "no_label",
    "label_mismatch",
    "empty_text",
    "control_chars",
    "length_outlier",
)


def check_languages(rows: dict[str, Rows]) -> tuple[list[int], dict, dict[str, list]]:
    """Align every language to English and check every pair (module docstring).

    Returns ``(kept English rows, report, pairs)``: a kept row is usable in every language;
    ``pairs[lang][k]`` is the row of ``lang`` paired with English row ``k``.
    """
    ref = rows[REFERENCE]
    n = len(ref.texts)
    en_dropped: dict[str, list[int]] = {"no_label": [], "empty_text": [], "control_chars": []}
    for k in range(n):
        problem = "no_label" if ref.labels[k] is None else _text_problem(ref.texts[k])
        if problem:
            en_dropped[problem].append(k)
    keep = [True] * n
    for ks in en_dropped.values():
        for k in ks:
            keep[k] = False
    en_dropped = {r: v for r, v in en_dropped.items() if v}
    report: dict = {REFERENCE: {"rows": n, "dropped": en_dropped, "kept": sum(keep)}}
    pairs_of: dict[str, list] = {}
    for lang in sorted(rows):
        if lang == REFERENCE:
            continue
        x = rows[lang]
        al = align_to_reference(ref, x)
        pairs_of[lang] = al.pair
        dropped: dict[str, list[int]] = {r: [] for r in REASONS}
        dropped["no_counterpart"] = sorted(al.no_counterpart)
        dropped["ambiguous_alignment"] = sorted(al.ambiguous)
        dropped["unaligned"] = sorted(al.unaligned)
        structural = {k for r in ("no_counterpart", "ambiguous_alignment", "unaligned")
                      for k in dropped[r]}  # fmt: skip
        candidates = []
        for k in range(n):
            j = al.pair[k]
            if k in structural or j is None:
                continue
            if x.labels[j] is None:
                dropped["no_label"].append(k)
            elif ref.labels[k] is not None and x.labels[j] != ref.labels[k]:
                dropped["label_mismatch"].append(k)
            elif problem := _text_problem(x.texts[j]):
                dropped[problem].append(k)
            elif ref.texts[k]:
                candidates.append((k, _log_ratio(len(ref.texts[k]), len(x.texts[j]))))
        med, scale = _robust([r for _, r in candidates])
        dropped["length_outlier"] = [
            k for k, r in candidates if abs(r - med) / scale > MAX_LENGTH_Z
        ]
        dropped = {r: v for r, v in dropped.items() if v}
        bad = structural.union(*dropped.values())
        for k in range(n):
            if k in bad or al.pair[k] is None:
                keep[k] = False
        report[lang] = {
            "rows": len(x.texts),
            "events": al.events,
            "extra_rows": al.extra_rows,
            "length_ratio_median": round(math.exp(med), 3),
            "dropped": dropped,
            "kept": sum(1 for k in range(n) if k not in bad and al.pair[k] is not None),
        }
    return [k for k in range(n) if keep[k]], report, pairs_of


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _summary(report: dict, langs: list[str]) -> list[str]:
    lines = []
    for lang in langs:
        r = report[lang]
        counts = ", ".join(f"{len(v)} {k}" for k, v in r["dropped"].items() if v) or "nothing"
        line = f"{lang}: {r['rows']} rows, dropped {counts}"
        for ev in r.get("events", []):
            if ev["kind"] in ("missing_rows", "extra_rows"):
                what = (
                    f"English rows {ev['rows']} have no {lang} counterpart"
                    if ev["kind"] == "missing_rows"
                    else f"{lang} rows {ev['extra_rows']} have no English counterpart"
                )
                line += (
                    f"; drift at English row {ev['at_row']} (labels disagree from row "
                    f"{ev['first_mismatch_row']}): {what}, shift {ev['shift_before']} -> "
                    f"{ev['shift_after']} realigns the next {ev['rows_after']} rows with "
                    f"{ev['label_mismatches_after']} label mismatches"
                )
                if ev["ambiguous_rows"]:
                    a = ev["ambiguous_rows"]
                    line += f" (boundary uncertain: rows {a[0]}..{a[-1]} dropped)"
            else:
                line += f"; {ev['kind']}: English rows {ev['rows'][0]}..{ev['rows'][1]}"
        line += f"; kept {r['kept']}"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- build


def _row(k: int, label: int, texts: dict[str, str], domain: str = DEFAULT_DOMAIN) -> dict:
    return {"id": f"{domain}-{k:05d}", "label": label, "text": texts}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


FILES = {
    "train": "train_en.jsonl",
    "unlabeled": "unlabeled.jsonl",
    "dev": "dev.jsonl",
    "test": "test.jsonl",
    "alignment": "alignment.json",
}


def _result(folder: Path, marker: dict) -> dict:
    report = json.loads((folder / FILES["alignment"]).read_text(encoding="utf-8"))
    return {
        "root": folder,
        **{f"{name}_file": folder / fname for name, fname in FILES.items()},
        "languages": list(marker["languages"]),
        "label_names": list(marker["label_names"]),
        "sizes": dict(marker["sizes"]),
        "alignment": report,
    }


def _extract(tmp: Path, archive: Path, sizes: dict[str, int], seed: int, domain: str) -> dict:
    """Read, check, split and write into ``tmp``; returns the marker's timing part."""
    t0 = time.perf_counter()
    raw = read_task_files(archive, domain)
    t_read = time.perf_counter() - t0
    rows = {lang: parse_task(data, LABEL_NAMES, name) for lang, (name, data) in raw.items()}
    langs = [REFERENCE] + sorted(lang for lang in rows if lang != REFERENCE)
    kept, report, pairs = check_languages(rows)
    ref = rows[REFERENCE]
    # English duplicates: only the first row of a text is used (no sentence in two splits)
    first: dict[str, int] = {}
    duplicates = [k for k, t in enumerate(ref.texts) if t and first.setdefault(_norm(t), k) != k]
    if duplicates:
        report[REFERENCE]["dropped"]["duplicate_text"] = duplicates
    dup = set(duplicates)
    pool = [k for k in kept if k not in dup]
    n_par = sizes["test"] + sizes["dev"] + sizes["unlabeled"]
    if n_par > len(pool):
        raise ValueError(f"{n_par} parallel rows requested, {len(pool)} available")
    rng = random.Random(seed)
    rng.shuffle(pool)
    test, dev = pool[: sizes["test"]], pool[sizes["test"] : sizes["test"] + sizes["dev"]]
    unlabeled = pool[sizes["test"] + sizes["dev"] : n_par]
    taken = set(pool[:n_par])
    en_bad = {k for v in report[REFERENCE]["dropped"].values() for k in v}
    english = [k for k in range(len(ref.texts)) if k not in en_bad and k not in taken]
    if sizes["train"] > len(english):
        raise ValueError(f"{sizes['train']} English rows requested, {len(english)} available")
    rng.shuffle(english)
    splits = {"train": english[: sizes["train"]], "unlabeled": unlabeled, "dev": dev, "test": test}

    def parallel(k: int) -> dict:
        texts = {REFERENCE: ref.texts[k]}
        texts.update({lang: rows[lang].texts[pairs[lang][k]] for lang in langs[1:]})
        return _row(k, ref.labels[k], texts, domain)

    en_rows = [_row(k, ref.labels[k], {REFERENCE: ref.texts[k]}, domain) for k in splits["train"]]
    _write_jsonl(tmp / FILES["train"], en_rows)
    for name in ("unlabeled", "dev", "test"):
        _write_jsonl(tmp / FILES[name], [parallel(k) for k in splits[name]])
    report_file = {
        "source": {"archive": archive.name, "members": {lang: raw[lang][0] for lang in langs}},
        "domain": domain,
        "languages": langs,
        "label_names": LABEL_NAMES,
        "reference": REFERENCE,
        "parameters": {
            "window": WINDOW,
            "tol": TOL,
            "max_shift": MAX_SHIFT,
            "lookback": LOOKBACK,
            "max_length_z": MAX_LENGTH_Z,
        },  # fmt: skip
        "summary": _summary(report, langs),
        "parallel_rows": len(kept),
        "parallel_rows_unique": len(pool),
        "english_rows_unique": len(ref.texts) - len(en_bad),
        "splits": {
            name: {
                "file": FILES[name],
                "rows": len(ks),
                "labels": dict(Counter(LABEL_NAMES[ref.labels[k]] for k in ks).most_common()),
            }
            for name, ks in splits.items()
        },
        "per_language": report,
    }
    write_json(tmp / FILES["alignment"], report_file)
    return {"read": round(t_read, 2), "build": round(time.perf_counter() - t0 - t_read, 2)}


def _build(out_dir, sizes: dict, seed: int, source_sha256: str, get_archive, domain: str) -> dict:
    out_dir = Path(out_dir).absolute()
    member_re(domain)  # an unknown domain fails before anything is read
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"n_{name} must be a non-negative int, got {v!r}")
    if sizes["test"] < 1 or sizes["unlabeled"] < 1:
        raise ValueError("n_test and n_unlabeled must be at least 1")
    params = {
        "sizes": sizes,
        "seed": seed,
        "source_sha256": source_sha256,
        "extractor_version": EXTRACTOR_VERSION,
    }
    if domain != DEFAULT_DOMAIN:  # (hotels folders built before domains existed stay valid)
        params["domain"] = domain
    marker = read_marker(out_dir)
    if marker is not None and marker.get("params") != params:
        raise FileExistsError(
            f"{out_dir} was built with {marker.get('params')}, not {params}; "
            "use another folder or remove it"
        )

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        archive = Path(get_archive())
        t_fetch = time.perf_counter() - t0
        seconds = _extract(tmp, archive, sizes, seed, domain)
        report = json.loads((tmp / FILES["alignment"]).read_text(encoding="utf-8"))
        return {
            "asset": f"multiemo-{domain}-sentence",
            "params": params,
            "languages": report["languages"],
            "label_names": LABEL_NAMES,
            "sizes": {name: s["rows"] for name, s in report["splits"].items()},
            "files": FILES,
            "seconds": {"fetch": round(t_fetch, 2), **seconds},
        }

    marker = build_folder(out_dir, build)
    if marker.get("params") != params:  # lost a race to a build with other arguments
        raise FileExistsError(f"{out_dir} was built with {marker.get('params')}, not {params}")
    return _result(out_dir, marker)


def build_multiemo(
    out_dir: Path,
    *,
    n_train: int = 2000,
    n_unlabeled: int = 500,
    n_dev: int = 200,
    n_test: int = 1000,
    seed: int = 0,
    sdist_dir: Path | None = None,
    domain: str = DEFAULT_DOMAIN,
    sdist: Path | None = None,
) -> dict:
    """Build (or reuse) the MultiEmo parallel corpus in ``out_dir`` (module docstring).

    ``sdist``: a local copy of ``bigbench-1.0.0.tar.gz``; else ``sdist_dir`` is where it is
    looked for / downloaded to (default ``<cache>/downloads``); its sha256 is pinned either
    way (:func:`fetch_sdist`; the index no longer serves it). ``domain``: one of
    :data:`DOMAINS` (the members ``<domain>_sentence_<lang>``; give each domain its own
    ``out_dir``). Returns ``{"root", "train_file", "unlabeled_file", "dev_file",
    "test_file", "alignment_file", "languages", "label_names", "sizes", "alignment"}``
    (``alignment``: the parsed ``alignment.json``). A complete folder is reused; one built
    with other arguments is an error.
    """
    sizes = {"train": n_train, "unlabeled": n_unlabeled, "dev": n_dev, "test": n_test}
    return _build(out_dir, sizes, seed, SDIST_SHA256, lambda: fetch_sdist(sdist_dir, sdist), domain)


def build_multiemo_from_archive(
    archive: Path,
    out_dir: Path,
    *,
    n_train: int = 2000,
    n_unlabeled: int = 500,
    n_dev: int = 200,
    n_test: int = 1000,
    seed: int = 0,
    domain: str = DEFAULT_DOMAIN,
) -> dict:
    """:func:`build_multiemo` from a local tar.gz in bigbench's member layout (not pinned)."""
    sizes = {"train": n_train, "unlabeled": n_unlabeled, "dev": n_dev, "test": n_test}
    return _build(out_dir, sizes, seed, sha256_file(archive), lambda: archive, domain)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m alsace_ds.tools.assets.multiemo",
        description="Extract MultiEmo (one domain, sentence level) from bigbench's sdist as an "
        "aligned parallel JSONL corpus.",
    )
    ap.add_argument("--out", type=Path, required=True, help="the folder to write")
    ap.add_argument(
        "--domain", choices=DOMAINS, default=DEFAULT_DOMAIN,
        help="which reviews (default hotels; 'all' = BIG-bench's union of the four)",
    )  # fmt: skip
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-unlabeled", type=int, default=500)
    ap.add_argument("--n-dev", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sdist-dir", type=Path, default=None, help="default: <cache>/downloads")
    ap.add_argument(
        "--sdist", type=Path, default=None,
        help=f"your copy of {SDIST_NAME} (sha256 checked): the index no longer serves it",
    )  # fmt: skip
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = _main_build(args)
    except (AssetError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in res["alignment"]["summary"]:
        print(line)
    print(f"{res['root']}: {res['sizes']} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _main_build(args: argparse.Namespace) -> dict:
    return build_multiemo(
        args.out,
        n_train=args.n_train,
        n_unlabeled=args.n_unlabeled,
        n_dev=args.n_dev,
        n_test=args.n_test,
        seed=args.seed,
        sdist_dir=args.sdist_dir,
        domain=args.domain,
        sdist=args.sdist,
    )


if __name__ == "__main__":
    sys.exit(main())
