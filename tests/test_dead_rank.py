"""A rank killed with SIGKILL in the middle of self-distillation makes the job FAIL (non-zero
exit, a message naming the dead process) within a bounded time instead of hanging on a
collective; nothing is left running, no /dev/shm buffer but the killed rank's own is left
behind (and no live process holds it), and the run directory holds no half-written outputs;
all seen before the test cleans up.

Both launchers: ``deepspeed`` (its per-node ``launch.py`` watches the ranks) and ``torchrun``
(the elastic agent watches them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _launch import child_env, free_port, launcher_cmd, pids_mentioning, rank_pids
from alsace_ds.tools import procs
from alsace_ds.tools.shm_cleanup import _mapped_paths

pytestmark = pytest.mark.launch

KILL_TO_EXIT_S = 90  # bound on: SIGKILL of rank 1 -> launcher exited
START_TIMEOUT_S = 420  # launcher start -> "distill: self-distillation" (loaded 2-core CI box)

OVERRIDES = [
    "model.family=xlmr",
    "deepspeed.config=ds_configs/zero2.json",
    "stage0.max_steps=3",
    "distill.max_steps=400",
    "distill.epochs=50",
    "deepspeed.timeout_s=30",
    "log.progress=false",
    "eval.every_epoch=false",
]


def _shm_buffers(port: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _wait_for(log: Path, text: str, proc: procs.Job, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(
        f"{text!r} not seen (launcher rc={proc.poll()}):\n{log.read_text()[-5000:]}"
    )


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigkilled_rank_fails_the_job_without_hanging(launcher, tmp_path, cache):
    run_dir = tmp_path / "run"
    log = tmp_path / "launcher.log"
    port = free_port()
    cmd = [*launcher_cmd(launcher, 2, port), f"run.output_dir={run_dir}", *OVERRIDES]
    proc = procs.start(cmd, child_env(cache), log=log, port=port)
    try:
        _wait_for(log, "distill: self-distillation", proc, START_TIMEOUT_S)
        time.sleep(3)  # into the distillation steps (forward/backward/all-reduce)
        ranks = rank_pids(run_dir)
        assert sorted(ranks) == [0, 1], (launcher, ranks)
        victim = ranks[1]
        assert proc.poll() is None, "the job ended before the kill"
        shm_running = _shm_buffers(port)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = proc.wait(timeout=KILL_TO_EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{launcher}: job still running {KILL_TO_EXIT_S}s after rank 1 was "
                f"SIGKILLed (hang):\n{log.read_text(errors='replace')[-5000:]}"
            ) from None
        took = time.monotonic() - killed_at
        # What the job left behind, seen BEFORE this test cleans anything up: the launcher
        # has exited; give the kernel a moment to reap its ranks.
        end = time.monotonic() + 10
        while pids_mentioning(str(run_dir)) and time.monotonic() < end:
            time.sleep(0.2)
        left_running = pids_mentioning(str(run_dir))
        shm_left = _shm_buffers(port)
        shm_held = {p for p in shm_left if str(p) in _mapped_paths()}
    finally:
        proc.kill()  # nothing of ours may outlive the test; the job's shm buffers go too
    text = log.read_text(errors="replace")
    print(f"{launcher}: rank 1 (pid {victim}) SIGKILLed; launcher rc={rc} after {took:.1f}s")
    assert rc != 0, text[-5000:]
    # the launcher names the dead process and its signal
    if launcher == "deepspeed":
        # launch.py's sigkill_handler: "[ERROR] ... ['.../python3', '-u', '.../train.py',
        # '--local_rank=1', ...] exits with return code = -9"; the launcher exits 256-9 = 247
        failed = [ln for ln in text.splitlines() if "exits with return code = -9" in ln]
        assert failed and "'--local_rank=1'" in failed[0], text[-5000:]
        assert rc == 247, rc
    else:
        assert "ChildFailedError" in text and "Signal 9 (SIGKILL)" in text, text[-5000:]
        # the elastic agent's summary: "Root Cause (first observed failure): ... rank 1
        # (local_rank: 1) exitcode : -9 (pid: N) (SIGKILL)"; torchrun exits 1
        root = text[text.index("Root Cause (first observed failure)") :]
        assert "local_rank: 1" in root and f"exitcode  : -9 (pid: {victim})" in root, root
        assert rc == 1, rc
    assert "exits successfully" not in text

    # nothing left running: neither the ranks nor the launcher
    assert left_running == [], left_running
    # /dev/shm as the job left it: under deepspeed each rank maps a DeepSpeed CPU all-reduce
    # buffer (named ..._<port>_<rank>); the surviving rank 0 unlinked its own on the way out
    # (train.py's release), the SIGKILLed rank 1 could not, and no live process holds that
    # leftover (so `make clean-shm` removes it). torchrun does not set LOCAL_SIZE: no buffers.
    names = [p.name.rsplit("_", 2)[1:] for p in shm_running]
    if launcher == "deepspeed":
        assert names == [[str(port), "0"], [str(port), "1"]], shm_running
        assert shm_left == [shm_running[1]], shm_left
        assert not shm_held, shm_held
    else:
        assert shm_running == shm_left == [], (shm_running, shm_left)

    # no half-written outputs: a committed checkpoint only, no report
    latest = run_dir / "checkpoints" / "distill" / "latest"
    if latest.exists():
        assert (latest.parent / latest.read_text().strip()).is_dir()
    assert not (run_dir / "report.json").exists() and not (run_dir / "report.md").exists()
    assert not (run_dir / "final" / "model").exists()
    # stage 0 finished before the kill: its checkpoint and export are complete
    tag = (run_dir / "checkpoints" / "stage0" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / "stage0" / tag).is_dir()
    assert (run_dir / "stage0" / "model" / "config.json").is_file()
