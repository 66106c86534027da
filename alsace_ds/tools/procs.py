"""Child jobs as process groups: the one way this project's tools, benches and tests start a
launcher (``deepspeed``, ``torchrun``, ``mpirun``) or a set of ranks and make sure that
nothing of it outlives them.

A job starts in its own session (:func:`start`) with a tag in its environment
(:data:`TAG_VAR`) that every process it starts inherits: a timeout or the end of the caller
kills the launcher's process group and every tagged process (SIGKILL; ``torchrun`` starts
each rank in a session of its own, and a rank whose launcher died is re-parented, so neither
the group nor the process tree reaches them all), and the DeepSpeed CPU all-reduce buffers of
the job's master port are removed from ``/dev/shm`` (the ``deepspeed`` launcher's ranks never
unlink theirs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from alsace_ds.tools.shm_cleanup import remove_port

ROOT = Path(__file__).resolve().parents[2]
TIMED_OUT = 124  # the return code of a job killed at its timeout (as timeout(1) gives)
TAG_VAR = "ALSACE_PROCS_JOB"  # in the environment of a job and of everything it starts


def torch_extensions_dir() -> Path:
    """Where the tests and benches let DeepSpeed JIT-build its CPU shm op: inside the venv it
    was built against (torch's default, ``~/.cache/torch_extensions``, is shared by every
    venv of the machine: two venvs in turn rebuild it at every launch, 40-75 s each, and an
    old session's build would outlive its venv)."""
    return Path(sys.prefix) / "torch_extensions"


def tagged(tag: str) -> list[int]:
    """The live processes (not zombies) whose environment holds ``TAG_VAR=tag``."""
    want = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if want not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


@dataclass
class Job:
    """A started process group; ``port``: its master port (shm buffers), if it has one;
    ``tag``: the value of :data:`TAG_VAR` in the environment of all its processes."""

    proc: subprocess.Popen
    tag: str
    port: int | None = None
    log: Path | None = None
    _sink: IO | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """The launcher's return code; ``subprocess.TimeoutExpired`` past ``timeout``."""
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole group (launcher and ranks)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the launcher's group and every other process of the job (its tag), reap the
        launcher, remove the port's shm buffers and close the log; safe to call twice."""
        self.signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (left := tagged(self.tag)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.port is not None:
            remove_port(self.port)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def output(self) -> str:
        """What the job wrote so far (its log file, or its captured stdout at the end)."""
        if self.log is not None:
            return self.log.read_text(errors="replace") if self.log.exists() else ""
        out, _ = self.proc.communicate()
        return out or ""

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start(
    cmd: list[str],
    env: dict[str, str],
    *,
    cwd: Path = ROOT,
    log: Path | None = None,
    port: int | None = None,
    header: str = "",
    stderr: int | None = subprocess.STDOUT,
) -> Job:
    """Start ``cmd`` in its own session; stdout (and stderr, unless ``stderr`` says where
    else) go to ``log`` (a file, written as the job runs, after ``header``) or are captured
    (read by :meth:`Job.output` / :func:`run`)."""
    sink = open(log, "w") if log is not None else None  # noqa: SIM115 - closed by Job.kill
    if sink is not None and header:
        sink.write(header)
        sink.flush()
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd, cwd=cwd, env={**env, TAG_VAR: tag}, text=True, start_new_session=True,
        stdout=sink if sink is not None else subprocess.PIPE, stderr=stderr,
    )  # fmt: skip
    return Job(proc, tag, port, log, sink)


@dataclass(frozen=True)
class Finished:
    returncode: int  # TIMED_OUT when killed at the timeout
    output: str
    timed_out: bool


def run(
    cmd: list[str],
    env: dict[str, str],
    timeout: float,
    *,
    cwd: Path = ROOT,
    log: Path | None = None,
    port: int | None = None,
    header: str = "",
) -> Finished:
    """:func:`start`, wait up to ``timeout`` seconds, then kill whatever of the group is
    left (always: a launcher that returned may leave a rank behind)."""
    job = start(cmd, env, cwd=cwd, log=log, port=port, header=header)
    timed_out = False
    try:
        if log is None:
            try:
                out, _ = job.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                job.signal(signal.SIGKILL)
                out, _ = job.proc.communicate()
                timed_out = True
        else:
            try:
                job.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        job.kill()
    if log is not None:
        out = job.output()
    rc = TIMED_OUT if timed_out else job.proc.returncode
    return Finished(rc, out or "", timed_out)
