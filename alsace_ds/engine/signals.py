"""Stop requests: what asks a run to stop, and the exit that says it stopped on request.

A stop is *requested* by SIGUSR1 / SIGTERM (Slurm's ``--signal``, its time limit, torchrun and
DeepSpeed's ``launch.py`` forwarding their own TERM) or by the launcher dying under the ranks
(:func:`watch_launcher`: a ``kill`` or ``timeout`` of the ``deepspeed`` command, whose runner
forwards nothing). Handlers only set a flag; the loops poll it at fixed points where all
ranks agree on it with one all-reduce (``alsace_ds.parallel.any_rank``), so every rank takes the
same branch. Training then commits a checkpoint and raises :class:`Preempted`; inference
raises :class:`StopRequested` (its finished results are kept, a partial one is redone).

The entry point exits with :data:`EXIT_PREEMPTED` and rank 0 writes ``ALSACE_STOP_FILE``
(when set): torchrun reports any failing rank as exit 1, so the Slurm batch script reads
that file, not the exit code, to decide whether to requeue.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, work committed; run again to resume
# How long the ranks of a dead launcher may take to commit their stop checkpoint before they
# exit anyway (torchrun's and launch.py's own grace before SIGKILL is 30 s).
LAUNCHER_GONE_GRACE_S = float(os.environ.get("ALSACE_LAUNCHER_GRACE_S", "60"))
# Command lines of the launchers whose death must stop the ranks (no rank outlives them).
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner",
                    "torch.distributed.run")  # fmt: skip
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")

_reasons: list[str] = []
_NAMES = {signal.SIGUSR1: "SIGUSR1", signal.SIGTERM: "SIGTERM"}


class Preempted(Exception):
    """Raised after the stop checkpoint is committed; the entry point exits with 75."""


class StopRequested(Exception):
    """Raised by an inference loop (evaluation, selection, dev check, export) that stopped
    on an agreed request before finishing; nothing of it is kept."""


def _handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal API
    # A second signal (e.g. during the save) only appends: nothing is interrupted mid-write.
    _reasons.append(_NAMES.get(signum, f"signal {signum}"))


def install() -> None:
    for sig in _NAMES:
        signal.signal(sig, _handler)


def request(reason: str) -> None:
    _reasons.append(reason)


def requested() -> bool:
    return bool(_reasons)


def reason() -> str:
    """Why this rank stops: its first request, or (agreed at a poll) another rank's."""
    return _reasons[0] if _reasons else "a request another rank saw"


def clear() -> None:
    """Forget requests (tests; a new run in the same process)."""
    _reasons.clear()


# ----------------------------------------------------------------------------- launcher watch


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks since boot (field 22 of /proc/PID/stat): pid reuse shows here
    name: str


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None when it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _launcher_name(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    for i, arg in enumerate(args[:4]):
        if arg == "-m" and i + 1 < len(args) and args[i + 1] in LAUNCHER_MODULES:
            return args[i + 1]
        if Path(arg).name in LAUNCHER_SCRIPTS:
            return Path(arg).name
    return None


def launcher_chain(pid: int | None = None) -> list[Proc]:
    """This process's launcher ancestors, nearest first: the run of parents whose command line
    is a known launcher (``launch.py`` then the ``deepspeed`` runner; torchrun). Empty under
    srun/mpirun, whose own daemons kill their tasks."""
    chain = []
    stat = _stat(pid or os.getpid())
    while stat is not None and stat[0] > 1:
        parent = stat[0]
        name = _launcher_name(parent)
        stat = _stat(parent)
        if name is None or stat is None:
            break
        chain.append(Proc(parent, stat[1], name))
    return chain


def gone(chain: list[Proc]) -> Proc | None:
    for proc in chain:
        stat = _stat(proc.pid)
        if stat is None or stat[1] != proc.start:
            return proc
    return None


def watch_launcher(on_exit, poll_s: float = 0.5) -> list[Proc]:
    """Start a daemon thread that requests a stop when a launcher ancestor dies, and calls
    ``on_exit()`` then ends the process (exit 75) if it still runs ``LAUNCHER_GONE_GRACE_S``
    later: nobody waits for these ranks any more, and a rerun must not race them."""
    chain = launcher_chain()
    if not chain:
        return chain

    def watch() -> None:
        while (dead := gone(chain)) is None:
            time.sleep(poll_s)
        request(f"the launcher ({dead.name}, pid {dead.pid}) exited")
        # Every rank that notices says so: the first to notice may not be rank 0.
        rank = os.environ.get("RANK", "?")
        print(f"alsace_ds: rank {rank}: the launcher ({dead.name}, pid {dead.pid}) exited: "
              f"stopping at a checkpoint, at most {LAUNCHER_GONE_GRACE_S:g} s", file=sys.stderr,
              flush=True)  # fmt: skip
        time.sleep(LAUNCHER_GONE_GRACE_S)
        on_exit()
        os._exit(EXIT_PREEMPTED)

    threading.Thread(target=watch, name="alsace-launcher-watch", daemon=True).start()
    return chain


def write_stop_file(text: str) -> None:
    """Tell the Slurm batch script that the ranks stopped on request (rank 0 only)."""
    path = os.environ.get("ALSACE_STOP_FILE")
    if path:
        from alsace_ds.io import atomic_write_text

        atomic_write_text(path, text + "\n")
