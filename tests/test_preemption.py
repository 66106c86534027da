"""What users and schedulers really do to a run, through the real entry point (2 CPU ranks
under the ``deepspeed`` launcher), each compared with one uninterrupted run of the same
config with dev checks, the best-model keeper and the collapse guard on:

* SIGKILL of the whole job right after a dev check (stage 0, stage 2), then a rerun: the
  guard history, the report and the final weights equal the uninterrupted run's (the
  training state comes from the checkpoint, not from files written after it);
* SIGTERM to the ``deepspeed`` command itself (what ``kill`` and ``timeout`` do): the ranks
  notice, commit and exit, none outlives its grace, and a rerun started at once waits for
  them (run-directory lock) and resumes;
* a planted pickle and a broken ``latest`` in a reused run directory are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _launch import LEAN, ROOT, TRAIN, child_env, free_port, launch

# Stage 0: 64 English examples = 2 steps per epoch, 4 epochs, dev checks at each epoch end
# (best-model keeper); stage 2: 8 steps, guard checks every 2; commits every 3 steps, so a
# kill after the check at step 4 resumes from step 3 and replays that check.
ARGS = [
    "task.k_shot=64",
    "stage0.epochs=4",
    "stage0.keep_best=true",
    "distill.max_steps=8",
    "distill.eval_every=2",
    "run.checkpoint_every=3",
    "run.log_every=1",
    "log.progress=false",
]


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


def _start(args: list[str], cache: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(port), str(TRAIN), *args, *LEAN]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(cache), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, port


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 300, poll=0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(poll)


def _ranks(out: Path) -> list[int]:
    res = subprocess.run(["pgrep", "-f", f"train.py --local_rank=. run.output_dir={out}"],
                         capture_output=True, text=True)  # fmt: skip
    return [int(p) for p in res.stdout.split()]


def _clean_shm(port: int) -> None:
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        f.unlink(missing_ok=True)


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


@pytest.mark.parametrize("stage", ["stage0", "distill"])
def test_sigkill_right_after_a_dev_check_then_resume(tmp_path, cache, reference, stage):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc, port = _start([f"run.output_dir={out}", *ARGS], cache, log)
    guard_file = out / "distill_guard.json"

    def checked_step4() -> bool:  # the dev check's own outputs are on disk
        if stage == "stage0":
            return "stage0 step 4: dev acc" in log.read_text() and _best_step(out) is not None
        if not guard_file.is_file():
            return False
        return any(c["step"] == 4 for c in json.loads(guard_file.read_text())["guard"]["history"])

    try:
        _wait_for(checked_step4, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)  # launcher and ranks: nothing runs any more
        proc.wait()
    finally:
        _clean_shm(port)
    folder = out / "checkpoints" / ("stage0" if stage == "stage0" else "distill")
    assert (folder / "latest").read_text() == "step3", "the kill came too late to test a replay"
    res = launch([f"run.output_dir={out}", *ARGS], cache)
    assert res.returncode == 0, res.stdout[-5000:]
    name = "stage0" if stage == "stage0" else "distill"
    assert f"{name}: resumed from checkpoint step3 (micro-step 3)" in res.stdout
    assert _guard_steps(out) == _guard_steps(reference) == [0, 2, 4, 6, 8]
    _same_as_reference(out, reference)


def test_term_to_the_deepspeed_command_stops_its_ranks_and_a_rerun_waits(
    tmp_path, cache, reference
):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc, port = _start([f"run.output_dir={out}", *ARGS], cache, log)
    try:
        _wait_for(lambda: "distill step 2: dev acc" in log.read_text(), proc, log)
        ranks = _ranks(out)
        assert len(ranks) == 2, ranks
        proc.send_signal(signal.SIGTERM)  # the runner only: it has no handler, it just dies
        assert proc.wait(timeout=10) == -signal.SIGTERM
        rerun = launch([f"run.output_dir={out}", *ARGS], cache)  # at once: races the ranks
        assert _ranks(out) == []
        assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may outlive the test
        except ProcessLookupError:
            pass
        _clean_shm(port)
    text = log.read_text()
    assert ": the launcher (deepspeed, pid" in text and "exited: stopping" in text
    # at a step boundary, or inside the dev check that follows one (redone on resume)
    assert "alsace_ds: distill" in text and "checkpoint committed" in text, text[-3000:]
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert "distill: resumed from checkpoint" in rerun.stdout
    _same_as_reference(out, reference)


def test_a_reused_run_directory_with_a_planted_pickle_or_a_broken_latest(
    tmp_path, cache, reference
):
    """The reference's committed stage-2 checkpoint with its later results removed (so the
    rerun must load it): a pickle planted in place of a shard is refused by name and never
    runs; garbage in ``latest`` or a tag that is not there is named, and nothing is deleted."""
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
    res = launch([f"run.output_dir={out}", *ARGS], cache)
    assert res.returncode == 2, res.stdout[-3000:]  # refused at start, before any model load
    assert f"checkpoint {folder / tag} is damaged:" in res.stdout, res.stdout[-3000:]
    assert "rank(s) on cpu" not in res.stdout
    assert "mp_rank_00_model_states.pt: " in res.stdout
    assert not marker.exists()

    tags = sorted(p.name for p in folder.iterdir())
    (folder / "latest").write_bytes(b"\x00\xff\xfe")
    res = launch([f"run.output_dir={out}", *ARGS], cache)
    assert res.returncode == 2 and f"{folder / 'latest'}: not a checkpoint tag" in res.stdout
    (folder / "latest").write_text("step999")
    res = launch([f"run.output_dir={out}", *ARGS], cache)
    assert res.returncode == 2, res.stdout[-3000:]
    assert f"{folder / 'latest'} names 'step999', which does not exist" in res.stdout
    assert sorted(p.name for p in folder.iterdir()) == tags  # nothing deleted
