"""Shared helpers of the benchmarks in ``bench/``: the model, synthetic parallel text, timing,
the machine description and the output (a Markdown table on stdout, JSON with ``--out``).

Models (``--model``):

- ``tiny``: a tiny random-init XLM-R classifier built locally with ``alsace_ds.tiny`` (seconds;
  for development and the smoke test ``tests/test_bench.py``);
- ``e5`` (default): multilingual-e5-small (BERT, 12 layers, hidden 384, 250k vocabulary,
  ~118M parameters) built by ``alsace_ds.assets.e5.build_e5_small`` into
  ``alsace_ds.tasks.cache_dir() / "e5-small"``;
- any other value: a local transformers folder with a tokenizer.

Every model is loaded through ``alsace_ds.models.load_scorer(family="xlmr")`` with dropout 0
(the e5 folder is ``model_type`` bert: load_scorer warns and loads it as a classifier). The
classification head is new (random, seeded) whenever the checkpoint has no head of the
requested size, which is fine for throughput and for equality checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

XNLI_LANGUAGES = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi",
                  "sw", "ur"]  # fmt: skip
PAWSX_LANGUAGES = ["en", "de", "es", "fr", "ja", "ko", "zh"]

TINY_LABELS = ["a", "b", "c"]


# ----------------------------------------------------------------------------- environment


def setup_env() -> None:
    """Quiet, reproducible settings shared by every bench (call before heavy imports).

    DeepSpeed's CPU accelerator; no tokenizer thread pool; and the same per-venv torch
    extensions folder as the test suite (``tests/conftest.py``), so the shm op that DeepSpeed
    JIT-builds is built once per venv, not once per caller."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(
            Path.home() / ".cache" / "torch_extensions_by_venv" / tag
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing/broken package is reported as None
        return None
    return str(getattr(mod, "__version__", "unknown"))


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions and the device the bench ran on."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem_total,
        "load_average_1_5_15": list(load) if load else None,
        "device": "cpu",
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
    }


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("load_average_1_5_15")
    load_s = "/".join(f"{x:.2f}" for x in load) if load else "n/a"
    mem = info.get("memory_bytes")
    mem_s = f"{mem / 2**30:.0f} GiB" if mem else "n/a"
    return (
        f"machine: {info['cpu_model']}, {info['usable_cores']} usable of "
        f"{info['logical_cores']} logical cores, {mem_s} RAM, torch threads "
        f"{info['torch_threads']}, load {load_s}; device {info['device']}; torch "
        f"{info['torch']}, deepspeed {info['deepspeed']}, transformers {info['transformers']}"
    )


# ----------------------------------------------------------------------------- models


def _tiny_words() -> list[str]:
    """A 2,000-word synthetic vocabulary (pseudo-syllables) for the tiny word-level tokenizer."""
    rng = random.Random(1234)
    onsets = "b d f g k l m n p r s t v z".split()
    vowels = "a e i o u".split()
    words: set[str] = set()
    while len(words) < 2000:
        words.add(
            "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        )
    return sorted(words)


def resolve_model(spec: str, *, tiny_max_length: int = 160) -> Path:
    """``tiny`` | ``e5`` | a folder -> the model folder (building tiny / e5 on first use)."""
    from alsace_ds.tasks import cache_dir

    if spec == "tiny":
        from alsace_ds.tiny import build_tiny_model

        out = cache_dir() / "bench" / f"tiny-xlmr-L{tiny_max_length}"
        return build_tiny_model(
            out, "xlmr", _tiny_words(), TINY_LABELS, seed=0, max_length=tiny_max_length
        )
    if spec == "e5":
        try:
            from alsace_ds.assets.e5 import build_e5_small
        except ImportError as exc:
            raise SystemExit(
                f"--model e5 needs alsace_ds.assets.e5.build_e5_small ({exc}); pass --model tiny "
                "or a local model folder instead"
            ) from exc
        return Path(build_e5_small(cache_dir() / "e5-small"))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SystemExit(f"--model {spec!r}: not 'tiny', 'e5' or an existing folder")
    return path


def load_model(path: Path, num_labels: int, seed: int = 0) -> tuple[Any, Any, list[str]]:
    """(scorer, tokenizer, load warnings): ``load_scorer('xlmr', ...)`` with dropout 0, fp32,
    in eval mode; a freshly initialised head is seeded (same seed -> same weights)."""
    from alsace_ds.models import load_scorer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer, tok, warnings = load_scorer("xlmr", path, num_labels, dropout=0.0)
    scorer.eval()
    return scorer, tok, warnings


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- synthetic text


def _token_pool(tokenizer: Any, lang: str, size: int, seed: int) -> list[int]:
    """``size`` vocabulary ids drawn for one language (its own seeded subset of the vocabulary,
    so languages differ in the pieces they use, as real languages do). Special tokens and
    pieces that decode to whitespace only are left out."""
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    rng = random.Random(f"{seed}-pool-{lang}")
    pool: list[int] = []
    seen: set[int] = set()
    tries = 0
    while len(pool) < size and tries < 50 * size and len(seen) < vocab:
        tries += 1
        tid = rng.randrange(vocab)
        if tid in special or tid in seen:
            continue
        seen.add(tid)
        if not tokenizer.decode([tid]).strip():
            continue
        pool.append(tid)
    if not pool:
        raise ValueError("the tokenizer vocabulary has no usable (non-special) token")
    return pool


class TextMaker:
    """Random sentences of a chosen length (in vocabulary pieces) per language.

    A sentence is ``k`` ids drawn from the language's pool, decoded to text; re-tokenizing the
    text gives about ``k`` tokens (SentencePiece may merge or split a few). The benches always
    report the lengths measured after tokenization."""

    def __init__(self, tokenizer: Any, languages: Sequence[str], seed: int, pool: int = 3000):
        self.tokenizer = tokenizer
        self.pools = {lang: _token_pool(tokenizer, lang, pool, seed) for lang in languages}

    def sentence(self, lang: str, num_tokens: int, rng: random.Random) -> str:
        pool = self.pools[lang]
        ids = [pool[rng.randrange(len(pool))] for _ in range(max(1, num_tokens))]
        return self.tokenizer.decode(ids).strip()


def language_factors(languages: Sequence[str], seed: int, spread: float = 0.2) -> dict[str, float]:
    """A fixed length multiplier per language (tokenization differs by language: the same
    sentence is longer in some); English is 1.0."""
    rng = random.Random(f"{seed}-factors")
    return {
        lang: 1.0 if lang == "en" else rng.uniform(1 - spread, 1 + spread) for lang in languages
    }


def token_lengths(tokenizer: Any, views: Sequence[Any], max_length: int) -> list[int]:
    """Tokens per view after encoding (special tokens included, truncated to ``max_length``)."""
    from alsace_ds.models import encode_views

    lengths: list[int] = []
    for i in range(0, len(views), 256):
        enc = encode_views(tokenizer, list(views[i : i + 256]), max_length)
        lengths += enc["attention_mask"].sum(dim=1).tolist()
    return lengths


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    s = sorted(lengths)
    return {
        "min": s[0],
        "p10": s[int(0.1 * (len(s) - 1))],
        "median": statistics.median(s),
        "p90": s[int(0.9 * (len(s) - 1))],
        "max": s[-1],
        "mean": statistics.fmean(s),
    }


# ----------------------------------------------------------------------------- timing/output


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call.

    CPU time (all threads of this process) is reported next to wall time: on a machine shared
    with other jobs, wall time includes the time the process waited for a core, CPU time much
    less so, and ratios of CPU times are the steadier cross-check."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            if x == 0 or not math.isfinite(x):
                return str(x)
            if abs(x) >= 100:
                return f"{x:,.0f}"
            if abs(x) >= 1:
                return f"{x:.2f}"
            return f"{x:.3g}"
        return str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def add_common_args(parser: Any, repeats: int = 3, threads: bool = True) -> None:
    parser.add_argument(
        "--model",
        default="e5",
        help="'e5' (multilingual-e5-small, built by alsace_ds.assets.e5 into the cache), "
        "'tiny' (tiny random XLM-R from alsace_ds.tiny) or a local transformers folder "
        "(default: e5)",
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed repeats (median; default {repeats})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of text and head (default 0)")
    if threads:
        parser.add_argument(
            "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
        )
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
