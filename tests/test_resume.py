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

pytestmark = pytest.mark.launch

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


def test_stop_and_resume_is_bit_identical(tmp_path, cache, straight):
    """Stopped in stage 0 (after step 3 of 5), resumed and stopped again in distill (5 steps
    later: distill's step 3 of 6), resumed to the end: the same per-step losses, weights and
    report as the straight run."""
    split = tmp_path / "split"
    # the deepspeed launcher exits with the ranks' status, 75; torchrun's says only "failed",
    # and ALSACE_STOP_FILE (what the Slurm script reads) says "stopped on request"
    for stop_after, stage, launcher in ((3, "stage0", "deepspeed"), (5, "distill", "torchrun")):
        stop_file = tmp_path / f"stopped-{stage}"
        env = {"ALSACE_STOP_FILE": str(stop_file)}
        res = launch([f"run.output_dir={split}", *RUN, f"run.stop_after_steps={stop_after}"],
                     cache, env=env, launcher=launcher)  # fmt: skip
        why = f"{stage} stopped at optimizer step 3 (run.stop_after_steps)"
        assert res.returncode == (EXIT_PREEMPTED if launcher == "deepspeed" else 1), res.stdout
        assert stop_file.read_text() == why + "\n", res.stdout[-5000:]
        assert f"alsace_ds: {why}; checkpoint committed, run again to resume" in res.stdout
        assert not (split / "report.json").exists()  # nothing final was written
        assert (split / "checkpoints" / stage / "latest").read_text().strip() == "step3"
    assert "stage0: resumed from checkpoint step3 (micro-step 3)" in res.stdout

    res = launch([f"run.output_dir={split}", *RUN], cache)
    assert res.returncode == 0, res.stdout[-5000:]
    assert "distill: resumed from checkpoint step3" in res.stdout

    for tag in ("stage0/train/loss", "distill/train/loss"):
        a, b = _losses(straight, tag), _losses(split, tag)
        steps = list(range(1, 6 if tag.startswith("stage0") else 7))
        assert sorted(a) == sorted(b) == steps, (tag, a, b)
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


def test_resume_refuses_a_different_setup(tmp_path, cache, straight, capsys):
    """The run directory of a 2-rank run (a copy of the straight one), continued by one
    process: refused for the world size, plus any key that changes the run, by name; nothing
    is touched."""
    import os
    import shutil
    from unittest import mock

    from alsace_ds.train import main

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt = out / "checkpoints" / "distill" / "step6"
    world = f"{ckpt} was written by 2 rank(s) and this job has 1: ZeRO keeps optimizer state"
    lr = (f"cannot continue {out} with a different setup (distill.lr: 0.0001 in the run "
          "directory, 0.5 now); use another run.output_dir")  # fmt: skip

    def refused(*extra: str) -> str:
        assert main([f"run.output_dir={out}", *RUN, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("alsace_ds: error:") == 1, err
        return err

    # In-process world of one: its launcher variables (MASTER_PORT...) must not leak into
    # the tests that follow (the Slurm script takes an exported MASTER_PORT as given).
    with mock.patch.dict(os.environ, {"ALSACE_CACHE": str(cache)}):  # the run's data files
        same = refused()  # the same config: refused for the world size alone
        assert world in same and same.count("\n  - ") == 1, same
        other = refused("distill.lr=0.5")
        assert world in other and lr in other and other.count("\n  - ") == 2, other
        never = refused("run.resume=never")
        assert f"run.output_dir: {out} already holds outputs (config.yaml, checkpoints" in never
    assert (out / "checkpoints" / "distill" / "latest").read_text().strip() == "step6"


def test_sigusr1_on_one_rank_stops_all_at_a_checkpoint(tmp_path, cache, capsys):
    """Slurm's --signal: one rank gets SIGUSR1; all ranks agree at the next step boundary,
    commit a checkpoint and stop on request (``ALSACE_STOP_FILE`` says so: torchrun's exit
    status cannot); the next run resumes and finishes. The ranks are frozen while the signal
    is sent, so that it lands in distill however fast this machine is."""
    import os
    import signal
    import time

    from _launch import child_env, free_port, frozen, launcher_cmd, rank_pids
    from alsace_ds.tools import procs

    out = tmp_path / "run"
    steps = 12
    args = [f"run.output_dir={out}", *RUN, f"distill.max_steps={steps}", "distill.epochs=50"]
    log = tmp_path / "log.txt"
    port = free_port()
    cmd = [*launcher_cmd("torchrun", 2, port), *args]
    stop_file = tmp_path / "stopped"
    env = child_env(cache, {"ALSACE_STOP_FILE": str(stop_file)})
    with procs.start(cmd, env, log=log, port=port) as proc:
        deadline = time.monotonic() + 300
        while "distill: self-distillation" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        ranks = rank_pids(out)
        assert sorted(ranks) == [0, 1], ranks
        with frozen(list(ranks.values())):
            os.kill(ranks[1], signal.SIGUSR1)  # rank 1 only; rank 0 learns it at the poll
        assert proc.wait(timeout=120) != 0, log.read_text()[-3000:]
    tag = (out / "checkpoints" / "distill" / "latest").read_text().strip()
    stopped = int(tag.removeprefix("step"))
    assert 0 < stopped < steps
    # rank 0, which prints, saw no signal itself: the ranks agreed on rank 1's request
    why = f"distill stopped at optimizer step {stopped} (a request another rank saw)"
    assert f"alsace_ds: {why}; checkpoint committed" in log.read_text(), log.read_text()[-3000:]
    assert stop_file.read_text() == why + "\n"
    # a different max_steps is a different setup: refused before any work, nothing touched
    # (in process: a world of one, refused for that too)
    from unittest import mock

    from alsace_ds.train import main

    with mock.patch.dict(os.environ, {"ALSACE_CACHE": str(cache)}):
        assert main([*args, f"distill.max_steps={steps + 1}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 2, err  # the world size, and:
    assert f"(distill.max_steps: {steps} in the run directory, {steps + 1} now)" in err, err
    assert (out / "checkpoints" / "distill" / "latest").read_text().strip() == tag
    res = launch(args, cache)
    assert res.returncode == 0, res.stdout[-5000:]
    assert f"distill: resumed from checkpoint {tag}" in res.stdout
    logged = sorted(_losses(out, "distill/train/loss"))
    assert logged == list(range(1, steps + 1))  # every step logged once, none lost or repeated
