"""What users and schedulers really do to a run, through the real entry point (2 CPU ranks
under ``torchrun``, or the ``deepspeed`` command where that launcher is what is tested),
each compared with one uninterrupted run of the same config with dev checks, the best-model
keeper and the collapse guard on:

* SIGKILL of the whole job right after a dev check (stage 0, stage 2), then a rerun: the
  guard history, the report and the final weights equal the uninterrupted run's (the
  training state comes from the checkpoint, not from files written after it);
* a stop requested inside a dev check (an epoch end's, the stage's last; both stages): the
  check is redone once on resume, never twice;
* SIGTERM to the ``deepspeed`` command itself (what ``kill`` and ``timeout`` do): the ranks
  notice, commit and exit within their grace, and a rerun started at once resumes;
* a planted pickle (its manifest entry mended, or not) and a broken ``latest`` in a reused
  run directory are refused, and the pickle never runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _launch import LEAN, ROOT, child_env, free_port, launch, launcher_cmd
from alsace_ds.engine.signals import LAUNCHER_GONE_GRACE_S
from alsace_ds.io import sha256_file
from alsace_ds.tools import procs

pytestmark = pytest.mark.launch

# Stage 0: 64 English examples = 2 steps per epoch, 4 epochs, dev checks at each epoch end
# (best-model keeper); distill: 64 parallel examples = 2 steps per epoch, 4 epochs, guard
# checks at the start and each epoch end (patience 3: a bad streak must count each check once);
# commits every 3 steps, so a kill after the check at step 4 resumes from step 3 and replays
# that check.
ARGS = [
    "task.k_shot=64",
    "task.max_unlabeled=64",
    "stage0.epochs=4",
    "stage0.keep_best=true",
    "distill.epochs=4",
    "distill.guard_patience=3",
    "run.checkpoint_every=3",
    "run.log_every=1",
    "log.progress=false",
]
INTERRUPT = ROOT / "tests" / "_interrupt_at_check.py"  # the entry point, interrupted at a check


PLANT = """import pathlib, pickle, sys
class Evil:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(sys.argv[1]),))
pickle.dump({"module": Evil()}, open(sys.argv[2], "wb"))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    res = launch([f"run.output_dir={out}", *ARGS], cache)
    assert res.returncode == 0, res.stdout[-5000:]
    return out


def _start(args: list[str], cache: Path, log: Path, launcher: str = "torchrun") -> procs.Job:
    """The entry point under a launcher as one process group, output to ``log``. (2 ranks
    reduce a+b in either order: runs under either launcher are bit-identical.)"""
    port = free_port()
    cmd = [*launcher_cmd(launcher, 2, port), *args, *LEAN]
    return procs.start(cmd, child_env(cache), log=log, port=port)


def _wait_for(cond, proc: procs.Job, log: Path, timeout: float = 300, poll=0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(poll)


def _ranks(out: Path) -> list[int]:
    res = subprocess.run(["pgrep", "-f", f"train.py --local_rank=. run.output_dir={out}"],
                         capture_output=True, text=True)  # fmt: skip
    return [int(p) for p in res.stdout.split()]


def _alive(pid: int) -> bool:
    """Not a zombie (a reaped-or-not process that has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _same_as_reference(out: Path, ref: Path) -> None:
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, out))
    for key in ("teachers", "students", "before", "after", "guard", "stage0_start"):
        assert ra[key] == rb[key], key
    wa = load_file(ref / "final" / "model" / "model.safetensors")
    wb = load_file(out / "final" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert (ref / "report.md").read_text() == (out / "report.md").read_text()


def _guard_steps(run_dir: Path) -> list[int]:
    return [c["step"] for c in json.loads((run_dir / "report.json").read_text())["guard"]["checks"]]


def _best_step(run_dir: Path) -> int | None:
    info = run_dir / "stage0" / "best.json"
    return json.loads(info.read_text())["step"] if info.is_file() else None


def test_sigkill_right_after_a_dev_check_then_resume(tmp_path, cache, reference):
    """The whole job SIGKILLed right after the dev check of step 4 (its outputs on disk, the
    last commit at step 3; ``tests/_interrupt_at_check.py``), in stage 0, then, in the rerun, in
    distill; each rerun resumes from step 3 and replays step 4 and its check: the guard's
    history, the best-model keeper, the report and the final weights equal the uninterrupted
    run's (the training state comes from the checkpoint, not from files written after it)."""
    out = tmp_path / "run"
    env = {"ALSACE_TEST_KILL_AFTER_CHECKS": "stage0@4,distill@4"}
    for stage in ("stage0", "distill"):
        res = launch([f"run.output_dir={out}", *ARGS], cache, script=INTERRUPT, env=env)
        assert res.returncode != 0 and "# ALSACE report" not in res.stdout, res.stdout[-3000:]
        assert f"{stage} step 4: dev acc" in res.stdout and f"{stage} step 6" not in res.stdout
        assert (out / "checkpoints" / stage / "latest").read_text() == "step3"
        if stage == "stage0":  # the keeper's record of the last new best: on disk
            best = re.findall(r"new best english dev accuracy \S+ at step (\d+)", res.stdout)
            assert _best_step(out) == int(best[-1]), (best, _best_step(out))
        else:
            guard = json.loads((out / "distill_guard.json").read_text())["guard"]["history"]
            assert [c["step"] for c in guard] == [0, 2, 4]  # written after the check: on disk
            assert "stage0: resumed from checkpoint step3 (micro-step 3)" in res.stdout
    res = launch([f"run.output_dir={out}", *ARGS], cache, script=INTERRUPT, env=env)
    assert res.returncode == 0, res.stdout[-5000:]
    assert "distill: resumed from checkpoint step3 (micro-step 3)" in res.stdout
    assert _guard_steps(out) == _guard_steps(reference) == [0, 2, 4, 6, 8]
    assert _best_step(out) == _best_step(reference)
    _same_as_reference(out, reference)


def _dev_steps(run_dir: Path) -> dict[str, list[int]]:
    """The steps of every dev check's TensorBoard points, over all of a run's attempts (a
    check done twice shows its step twice)."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = ["stage0/dev/accuracy/en", "distill/guard/english_dev_accuracy"]
    return {t: sorted(e.step for e in acc.Scalars(t)) for t in tags}


def test_a_stop_inside_a_dev_check_is_redone_once(tmp_path, cache, reference):
    """Stops requested inside dev checks (``tests/_interrupt_at_check.py``): stage 0's epoch-end
    check after step 4 and its final check (step 8), then distill's (steps 4 and 8). Each
    attempt commits with the check pending and stops on request (torchrun's exit status cannot
    say so; ``ALSACE_STOP_FILE`` does, as for the Slurm script); the next redoes that check
    first and never checks the same step again (at the epoch boundary or at the stage's end),
    so the guard's history, the best-model keeper and the report equal the uninterrupted
    run's."""
    out = tmp_path / "run"
    wanted = ["stage0@4", "stage0@8", "distill@4", "distill@8"]
    stops = []
    for attempt in range(5):
        stop_file = tmp_path / f"stop{attempt}"
        env = {"ALSACE_TEST_STOP_IN_CHECKS": ",".join(wanted), "ALSACE_STOP_FILE": str(stop_file)}
        res = launch([f"run.output_dir={out}", *ARGS], cache, script=INTERRUPT, env=env)
        said = re.findall(r"alsace_ds: (\w+: stopped during \w+ dev \(SIGUSR1\) at optimizer "
                          r"step \d+); checkpoint committed", res.stdout)  # fmt: skip
        if attempt == 4:  # no stop left to request: the run ends
            assert res.returncode == 0 and not said and not stop_file.exists(), res.stdout[-5000:]
            break
        assert res.returncode != 0, res.stdout[-5000:]
        assert len(said) == 1 and stop_file.read_text() == said[0] + "\n", res.stdout[-5000:]
        stops += said
    assert stops == [
        f"{stage}: stopped during {stage} dev (SIGUSR1) at optimizer step {step}"
        for stage in ("stage0", "distill")
        for step in (4, 8)
    ]
    assert (out / "interrupts.done").read_text().split() == sorted(f"stop-in-{w}" for w in wanted)
    assert (
        _dev_steps(out)
        == _dev_steps(reference)
        == {
            "stage0/dev/accuracy/en": [2, 4, 6, 8],
            "distill/guard/english_dev_accuracy": [0, 2, 4, 6, 8],
        }
    )
    assert _guard_steps(out) == [0, 2, 4, 6, 8]
    assert _best_step(out) == _best_step(reference)
    _same_as_reference(out, reference)


def test_term_to_the_deepspeed_command_stops_its_ranks_and_a_rerun_waits(
    tmp_path, cache, reference
):
    out, log, rerun_log = tmp_path / "run", tmp_path / "log.txt", tmp_path / "rerun.txt"
    with _start([f"run.output_dir={out}", *ARGS], cache, log, "deepspeed") as job:
        _wait_for(lambda: "distill step 2: dev acc" in log.read_text(), job, log)
        ranks = _ranks(out)
        assert len(ranks) == 2, ranks
        job.proc.send_signal(signal.SIGTERM)  # the runner only: it has no handler, it just dies
        assert job.wait(timeout=10) == -signal.SIGTERM
        with _start([f"run.output_dir={out}", *ARGS], cache, rerun_log) as rerun:  # races them
            t0 = time.monotonic()  # the orphaned ranks commit and exit within their grace
            while any(_alive(pid) for pid in ranks):
                assert time.monotonic() - t0 < LAUNCHER_GONE_GRACE_S + 15, log.read_text()[-3000:]
                time.sleep(0.2)
            assert rerun.wait(timeout=600) == 0, rerun_log.read_text()[-5000:]
        shm = f"deepspeed_allreduce_buffer_*_{job.port}_*"
        assert list(Path("/dev/shm").glob(shm)) == []
    rerun = subprocess.CompletedProcess([], 0, rerun_log.read_text(), "")
    text = log.read_text()
    assert ": the launcher (deepspeed, pid" in text and "exited: stopping" in text
    # at a step boundary, or inside the dev check that follows one (redone on resume)
    assert "alsace_ds: distill" in text and "checkpoint committed" in text, text[-3000:]
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert "distill: resumed from checkpoint" in rerun.stdout
    _same_as_reference(out, reference)


def test_a_reused_run_directory_with_a_planted_pickle_or_a_broken_latest(
    tmp_path, cache, reference, capsys
):
    """The reference's committed stage-2 checkpoint with its later results removed (so the
    rerun must load it): a pickle planted in place of a shard is refused by name (at start, by
    the manifest; with its manifest entry mended, at the load, by the weights-only loader,
    through the real launcher) and never runs; garbage in ``latest`` or a tag that is not
    there is named, and nothing is deleted (these two in process: ``train.main``)."""
    from unittest import mock

    from alsace_ds.train import main

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("after", "final"):
        (out / "results" / f"{name}.json").unlink()
    folder = out / "checkpoints" / "distill"
    tag = (folder / "latest").read_text()
    marker = tmp_path / "pwned"
    plant = tmp_path / "plant.py"
    plant.write_text(PLANT)
    evil = subprocess.run([sys.executable, str(plant), str(marker),
                           str(folder / tag / "mp_rank_00_model_states.pt")])  # fmt: skip
    assert evil.returncode == 0

    def refused() -> str:  # at start: exit 2, one message, nothing loaded
        with mock.patch.dict(os.environ, {"ALSACE_CACHE": str(cache)}):
            assert main([f"run.output_dir={out}", *LEAN, *ARGS]) == 2
        cap = capsys.readouterr()
        assert cap.err.count("alsace_ds: error:") == 1 and "rank(s) on cpu" not in cap.out
        return cap.err

    res = launch([f"run.output_dir={out}", *ARGS], cache, launcher="deepspeed")
    assert res.returncode == 2, res.stdout[-3000:]  # refused at start, before any model load
    assert f"checkpoint {folder / tag} is damaged:" in res.stdout, res.stdout[-3000:]
    assert "rank(s) on cpu" not in res.stdout
    assert "mp_rank_00_model_states.pt: " in res.stdout
    assert not marker.exists()
    # the manifest mended to list the planted file: start-up passes it, the load meets it and
    # DeepSpeed's file goes through the weights-only loader, which refuses it unrun
    states = folder / tag / "mp_rank_00_model_states.pt"
    manifest = json.loads((folder / tag / "manifest.json").read_text())
    manifest["files"][states.name] = {"bytes": states.stat().st_size, "sha256": sha256_file(states)}
    (folder / tag / "manifest.json").write_text(json.dumps(manifest))
    res = launch([f"run.output_dir={out}", *ARGS], cache, launcher="deepspeed")
    assert res.returncode == 2, res.stdout[-3000:]
    assert "distill: resumed from checkpoint" not in res.stdout
    assert "mp_rank_00_model_states.pt: refused to load" in res.stdout, res.stdout[-3000:]
    assert not marker.exists()  # the planted pickle never ran

    tags = sorted(p.name for p in folder.iterdir())
    (folder / "latest").write_bytes(b"\x00\xff\xfe")
    assert f"{folder / 'latest'}: not a checkpoint tag" in refused()
    (folder / "latest").write_text("step999")
    assert f"{folder / 'latest'} names 'step999', which does not exist" in refused()
    assert sorted(p.name for p in folder.iterdir()) == tags  # nothing deleted
