"""Run the real entry point under the real ``deepspeed`` launcher (2 CPU ranks, gloo) and
independently recompute what it reported, in one plain process."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist_helpers import prebuild_shm_op
from alsace_ds.config import load_config
from alsace_ds.data.corpus import load_parallel_jsonl
from alsace_ds.data.tokens import encode_views
from alsace_ds.models.scorers import load_scorer
from alsace_ds.parallel import free_port
from alsace_ds.tools import procs

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "alsace_ds" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def child_env(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        ALSACE_CACHE=str(cache),
    )
    env.update(extra or {})
    return env


def run_cmd(
    cmd: list[str], env: dict[str, str], timeout: float, port: int | None = None
) -> subprocess.CompletedProcess:
    """Run as one process group (:func:`alsace_ds.tools.procs.run`): on timeout the whole
    group (launcher + ranks) is killed and the test fails with the output's end; nothing of
    ours outlives the call, and the shm buffers of ``port`` are removed."""
    res = procs.run(cmd, env, timeout, cwd=ROOT, port=port)
    if res.timed_out:
        raise AssertionError(f"timed out after {timeout}s:\n{res.output[-5000:]}")
    return subprocess.CompletedProcess(cmd, res.returncode, res.output, "")


def pids_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(proc.name))
    return found


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{local rank: pid} of the entry point's ranks writing ``run_dir``, under either
    launcher: ``deepspeed`` passes ``--local_rank=N`` on the command line, ``torchrun`` (and
    Slurm's srun + torchrun) sets ``LOCAL_RANK`` in the environment; the launchers' own
    processes (which name the run directory too) are not ranks."""
    ranks = {}
    for pid in pids_mentioning(f"run.output_dir={run_dir}"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in cmd or not any(c.endswith(b".py") for c in cmd):
            continue  # a launcher (python -m ..., bash -c ...)
        flag = next((c for c in cmd if c.startswith(b"--local_rank=")), None)
        var = next((e for e in env if e.startswith(b"LOCAL_RANK=")), None)
        if flag is not None or var is not None:
            ranks[int((flag or var).split(b"=", 1)[1])] = pid
    return ranks


@contextlib.contextmanager
def frozen(pids: list[int]):
    """SIGSTOP ``pids`` for the block, SIGCONT after: a signal sent meanwhile is pending when
    they go on, so it lands where they were frozen, however fast this machine is (to the
    processes, a slow machine)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


# What a test run skips unless it checks it (``lean=False``): the figures and the two dev
# passes of the saved dev predictions (together ~5 s per run, most of the suite's runs).
LEAN = ["log.plots=false", "eval.dev_predictions=false"]


def launcher_cmd(launcher: str, nproc: int, port: int, script: Path = TRAIN) -> list[str]:
    """The command line of one of the two launchers a user starts ranks with, up to the
    entry point: ``deepspeed --num_gpus N`` (its runner and per-node ``launch.py``; the ranks
    use DeepSpeed's shared-memory CPU all-reduce) or ``torchrun --nproc_per_node N`` (the
    elastic agent; plain gloo collectives; ~8 s less start-up per run on 2 cores)."""
    if launcher == "deepspeed":
        prebuild_shm_op()  # once, in one process: 2 ranks racing to JIT-build it take ~45 s
        return [str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", str(port), str(script)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), str(script)]  # fmt: skip
    raise ValueError(f"launcher must be deepspeed or torchrun, not {launcher!r}")


def launch(
    overrides: list[str],
    cache: Path,
    nproc: int = 2,
    timeout: float = 600,
    script: Path = TRAIN,
    env: dict[str, str] | None = None,
    lean: bool = True,
    launcher: str = "torchrun",
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N alsace_ds/train.py key=value ...`` (``launcher=
    "deepspeed"``: the ``deepspeed`` command; tests of that launcher, and the runs compared
    with them, name it), or another entry ``script``, with ``env`` added to the ranks'
    environment; cleans its shm buffers. ``lean``: :data:`LEAN` first (the test's own
    overrides win)."""
    overrides = [*LEAN, *overrides] if lean else overrides
    port = free_port()
    cmd = [*launcher_cmd(launcher, nproc, port, script), *overrides]
    return run_cmd(cmd, child_env(cache, env), timeout, port)


def run_single(
    overrides: list[str],
    cache: Path,
    timeout: float = 600,
    script: Path = TRAIN,
    env: dict[str, str] | None = None,
    lean: bool = True,
):
    """The same entry point as one plain process (world size 1)."""
    overrides = [*LEAN, *overrides] if lean else overrides
    return run_cmd([sys.executable, str(script), *overrides], child_env(cache, env), timeout)


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
    max_examples: int | None = None,
):
    """``[N, T, C]`` label distributions of every view, one process, no DeepSpeed. The
    weights load in fp32 (what the run exports); ``dtype`` bf16 computes under
    ``torch.autocast`` as the run does (bf16 predictions are not fp32 predictions)."""
    scorer, tok, _ = load_scorer(family, model_dir, len(labels), label_words=words)
    corpus = load_parallel_jsonl(
        corpus_path, languages, labels, require_label=False, max_examples=max_examples
    )
    out = torch.empty(len(corpus), len(languages), len(labels))
    low = dtype != torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        for t, lang in enumerate(languages):
            views = corpus.texts(lang)
            for i in range(0, len(views), 256):
                enc = encode_views(tok, views[i : i + 256], max_length)
                out[i : i + 256, t] = torch.softmax(scorer(**enc).float(), dim=-1)
    return out, corpus


# ----------------------------------------------------------------------------- what a run did


def stage0_used(run_dir: Path, stdout: str) -> Path:
    """The stage-0 model folder that selection, the evaluation before and distillation started
    from, as the run records it: ``stage0/best`` when the run kept a best model
    (``stage0.keep_best`` with dev checks: BestKeeper's ``stage0/best.json``, copied into
    report.json as ``stage0_start``), else ``stage0/model``, or with stage 0 off the model it
    was given (``stage0.init_from``); the console line must agree."""
    report = json.loads((run_dir / "report.json").read_text())
    best = run_dir / "stage0" / "best.json"
    cfg = load_config(run_dir / "config.yaml")
    if not cfg.stage0.enabled:
        assert report["stage0_start"] is None and not best.exists()
        folder = Path(cfg.stage0.init_from)
    elif report["stage0_start"] is not None:
        assert report["stage0_start"] == json.loads(best.read_text()), report["stage0_start"]
        folder = run_dir / "stage0" / "best"
    else:
        assert not best.exists(), "a best stage-0 model was kept but report.json has none"
        folder = run_dir / "stage0" / "model"
    said = re.findall(r"distill starts from (\S+)", stdout)
    assert said == [str(folder)], (said, str(folder))
    assert (folder / "config.json").is_file()
    return folder


def recompute_for(run_dir: Path, model_dir: Path, corpus_key: str):
    """(config, ``[N, T, C]`` probabilities, corpus) of ``model_dir`` on the run's
    ``task.<corpus_key>`` file, recomputed in this process (the run's compute dtype)."""
    cfg = load_config(run_dir / "config.yaml")
    t = cfg.task
    words = (cfg.model.label_words or t.labels) if cfg.model.family == "mt5" else None
    probs, corpus = recompute_probs(
        model_dir,
        cfg.model.family,
        getattr(t, corpus_key),
        t.languages,
        t.labels,
        words,
        cfg.model.max_length,
        {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.model.resolved_dtype],
        t.max_unlabeled if corpus_key == "unlabeled_file" else None,  # the run's first N
    )
    return cfg, probs, corpus


def accuracy(probs: torch.Tensor, corpus, languages) -> dict[str, float]:
    labels = corpus.labels()
    pred = probs.argmax(-1)  # [N, T]
    return {
        lang: 100.0 * float((pred[:, t] == labels).double().mean())
        for t, lang in enumerate(languages)
    }


def naive_selection(probs: torch.Tensor, languages, threshold: float | None = None) -> dict:
    """Teacher selection written out from METHOD.md (stage 1) with plain Python loops, not the
    package's code: per-view argmax and majority vote (ties: the smallest label), s_t = mean
    probability of the pseudo-label, shat = softmax(s), teachers = shat >= theta (1/T unless
    given; relative tolerance 1e-9 as documented)."""
    p = probs.double().tolist()  # [N][T][C]
    N, T = len(p), len(languages)

    def first_max(row):
        return max(range(len(row)), key=lambda c: (row[c], -c))

    yhat = [[first_max(p[i][t]) for t in range(T)] for i in range(N)]
    pseudo = []
    for i in range(N):
        votes = [yhat[i].count(c) for c in range(len(p[i][0]))]
        pseudo.append(first_max(votes))
    s = [sum(p[i][t][pseudo[i]] for i in range(N)) / N for t in range(T)]
    agreement = [sum(yhat[i][t] == pseudo[i] for i in range(N)) / N for t in range(T)]
    z = sum(math.exp(x) for x in s)
    shat = [math.exp(x) / z for x in s]
    theta = threshold if threshold is not None else sum(shat) / T
    teachers = [x for x, v in zip(languages, shat, strict=True) if v >= theta * (1 - 1e-9)]
    return {"teachers": teachers, "students": [x for x in languages if x not in teachers],
            "s_t": s, "shat_t": shat, "agreement": agreement, "threshold": theta}  # fmt: skip


def check_selection(
    run_dir: Path, model_dir: Path, tol: float = 1e-5, agreement_tol: float = 1e-6
) -> dict:
    """selection.json (and report.json's roles) == :func:`naive_selection` of ``model_dir``'s
    predictions on every view, recomputed in one process. ``tol``: on s_t (shat_t gets a
    tenth of it); ``agreement_tol``: on each language's share of views agreeing with the
    pseudo-label (fp32: the same predictions; bf16: a near tie may flip)."""
    cfg, probs, corpus = recompute_for(run_dir, model_dir, "unlabeled_file")
    sel = json.loads((run_dir / "selection.json").read_text())
    ref = naive_selection(probs, cfg.task.languages, cfg.selection.threshold)
    assert (sel["teachers"], sel["students"]) == (ref["teachers"], ref["students"]), (sel, ref)
    assert ref["teachers"] and ref["students"]  # a real vote: neither side empty
    if cfg.selection.teachers is None:
        assert (sel["teachers_used"], sel["students_used"]) == (ref["teachers"], ref["students"])
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["teachers"], report["students"]) == (sel["teachers_used"], sel["students_used"])
    assert sel["num_examples"] == len(corpus)
    assert sel["threshold"] == pytest.approx(ref["threshold"], rel=1e-9)
    for t, lang in enumerate(cfg.task.languages):
        row = sel["languages"][lang]
        assert row["s_t"] == pytest.approx(ref["s_t"][t], abs=tol), lang
        assert row["shat_t"] == pytest.approx(ref["shat_t"][t], abs=tol / 10), lang
        assert row["agreement"] == pytest.approx(ref["agreement"][t], abs=agreement_tol), lang
    return sel


def check_report(
    run_dir: Path, before_dir: Path, after_dir: Path | None, tol: float = 1e-9
) -> dict:
    """report.json's accuracies and gaps before/after == a one-process evaluation of the
    models the run started from and exported, on the whole test file. ``tol`` in points
    (fp32: the same predictions; bf16 near-ties may flip with the batch shapes)."""
    report = json.loads((run_dir / "report.json").read_text())
    for when, model in (("before", before_dir), ("after", after_dir)):
        if model is None:
            assert report[when] is None
            continue
        cfg, probs, corpus = recompute_for(run_dir, model, "test_file")
        acc = accuracy(probs, corpus, cfg.task.languages)
        assert report[when]["accuracy"] == pytest.approx(acc, abs=tol), (when, acc)
        assert report["num_test_examples"] == len(corpus)
        en = cfg.task.english
        for lang in cfg.task.languages if en is not None else []:
            gap = acc[en] - acc[lang]
            assert report[when]["gap"][lang] == pytest.approx(gap, abs=2 * tol), (when, lang)
    return report
