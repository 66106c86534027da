"""Run the real entry point under the real ``deepspeed`` launcher (2 CPU ranks, gloo) and
independently recompute what it reported, in one plain process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from _dist_helpers import free_port
from alsace_ds.data.corpus import load_parallel_jsonl
from alsace_ds.models.scorers import encode_views, load_scorer

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "alsace_ds" / "train.py"


def child_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        ALSACE_CACHE=str(cache),
    )
    return env


def run_cmd(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group; on timeout kill the whole group (launcher + ranks)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-5000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of ours may outlive the test
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def launch(
    overrides: list[str], cache: Path, nproc: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N alsace_ds/train.py key=value ...``; cleans its shm buffers."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(port),
        str(TRAIN),
        *overrides,
    ]
    try:
        return run_cmd(cmd, child_env(cache), timeout)
    finally:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            f.unlink(missing_ok=True)


def run_single(overrides: list[str], cache: Path, timeout: float = 600):
    """The same entry point as one plain process (world size 1)."""
    return run_cmd([sys.executable, str(TRAIN), *overrides], child_env(cache), timeout)


@torch.no_grad()
def recompute_probs(
    model_dir: Path,
    family: str,
    corpus_path: str,
    languages,
    labels,
    words,
    max_length: int,
    dtype: torch.dtype = torch.float32,
):
    """``[N, T, C]`` label distributions of every view, one process, no DeepSpeed. The
    weights load in fp32 (what the run exports); ``dtype`` bf16 computes under
    ``torch.autocast`` as the run does (bf16 predictions are not fp32 predictions)."""
    scorer, tok, _ = load_scorer(family, model_dir, len(labels), label_words=words)
    corpus = load_parallel_jsonl(corpus_path, languages, labels, require_label=False)
    out = torch.empty(len(corpus), len(languages), len(labels))
    low = dtype != torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        for t, lang in enumerate(languages):
            views = corpus.texts(lang)
            for i in range(0, len(views), 256):
                enc = encode_views(tok, views[i : i + 256], max_length)
                out[i : i + 256, t] = torch.softmax(scorer(**enc).float(), dim=-1)
    return out, corpus
