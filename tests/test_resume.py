"""Stop and resume: k steps, stop (checkpoint, exit 75), resume to N == N steps straight:
identical per-step losses and identical final weights (2 ranks, CPU, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _launch import launch
from alsace_ds.engine.signals import EXIT_PREEMPTED

RUN = [
    "stage0.max_steps=5",
    "distill.max_steps=6",
    "run.log_every=1",
    "run.keep_checkpoints=1",
    "log.progress=false",
    "eval.every_epoch=false",
]


def _losses(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """The uninterrupted run both stop-and-resume runs are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    res = launch([f"run.output_dir={out}", *RUN], cache)
    assert res.returncode == 0, res.stdout[-5000:]
    return out


@pytest.mark.parametrize("stop_after", [3, 8], ids=["in-stage0", "in-distill"])
def test_stop_and_resume_is_bit_identical(tmp_path, cache, straight, stop_after):

    split = tmp_path / "split"
    res = launch([f"run.output_dir={split}", *RUN, f"run.stop_after_steps={stop_after}"], cache)
    assert res.returncode == EXIT_PREEMPTED, res.stdout[-5000:]
    assert "checkpoint committed, run again to resume" in res.stdout
    assert not (split / "report.json").exists()  # nothing final was written
    stage = "stage0" if stop_after <= 5 else "distill"
    tag = (split / "checkpoints" / stage / "latest").read_text().strip()
    assert tag == f"step{stop_after if stage == 'stage0' else stop_after - 5}"

    res = launch([f"run.output_dir={split}", *RUN], cache)
    assert res.returncode == 0, res.stdout[-5000:]
    assert "resumed from checkpoint" in res.stdout

    for tag in ("stage0/train/loss", "distill/train/loss"):
        a, b = _losses(straight, tag), _losses(split, tag)
        assert sorted(a) == sorted(b) and len(a) >= 5, (tag, a, b)
        assert a == b, tag  # bit-identical per-step losses
    wa = load_file(straight / "final" / "model" / "model.safetensors")
    wb = load_file(split / "final" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    ra = json.loads((straight / "report.json").read_text())
    rb = json.loads((split / "report.json").read_text())
    assert ra["after"]["accuracy"] == rb["after"]["accuracy"]
    # keep_checkpoints=1: only the newest tag remains per stage
    tags = [p.name for p in (split / "checkpoints" / "distill").iterdir() if p.is_dir()]
    assert tags == ["step6"]


def test_resume_refuses_a_different_setup(tmp_path, cache):
    out = tmp_path / "run"
    res = launch([f"run.output_dir={out}", *RUN, "run.stop_after_steps=2"], cache)
    assert res.returncode == EXIT_PREEMPTED, res.stdout[-5000:]
    import os
    from unittest import mock

    from alsace_ds.train import main

    # In-process world of one: its launcher variables (MASTER_PORT...) must not leak into
    # the tests that follow (the Slurm script takes an exported MASTER_PORT as given).
    with mock.patch.dict(os.environ):
        assert main([f"run.output_dir={out}", *RUN, "distill.lr=0.5"]) == 2
        assert main([f"run.output_dir={out}", *RUN, "run.resume=never"]) == 2


def test_sigusr1_on_one_rank_stops_all_at_a_checkpoint(tmp_path, cache):
    """Slurm's --signal: one rank gets SIGUSR1; all ranks agree at the next step boundary,
    commit a checkpoint and exit 75; the next run resumes and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from _launch import ROOT, TRAIN, child_env, free_port

    out = tmp_path / "run"
    args = [f"run.output_dir={out}", *RUN, "distill.max_steps=80", "distill.epochs=50"]
    log = tmp_path / "log.txt"
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
    cmd += ["--master_port", str(port), str(TRAIN), *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(cache), stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "distill: self-distillation" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1)
        ranks = subprocess.run(
            ["pgrep", "-f", f"local_rank=1 run.output_dir={out}"], capture_output=True, text=True
        ).stdout.split()
        assert len(ranks) == 1, ranks
        os.kill(int(ranks[0]), signal.SIGUSR1)
        assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            f.unlink(missing_ok=True)
    text = log.read_text()
    assert "distill stopped at optimizer step" in text
    tag = (out / "checkpoints" / "distill" / "latest").read_text().strip()
    stopped = int(tag.removeprefix("step"))
    assert 0 < stopped < 80
    res = launch([*args, "distill.max_steps=90"], cache)
    # a different max_steps is a different setup: refused before any work, nothing touched
    assert res.returncode == 2 and "cannot continue" in res.stdout, res.stdout[-3000:]
    assert (out / "checkpoints" / "distill" / "latest").read_text().strip() == tag
    res = launch(args, cache)
    assert res.returncode == 0, res.stdout[-5000:]
    assert f"distill: resumed from checkpoint {tag}" in res.stdout
    steps = sorted(_losses(out, "distill/train/loss"))
    assert steps == list(range(1, 81))  # every step logged once, none lost or repeated
