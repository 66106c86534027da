"""Preemption: SIGUSR1 / SIGTERM (Slurm's ``--signal``) only set a flag here; the training
loop reads it at the next optimizer-step boundary, where all ranks agree on it with one
all-reduce, save a checkpoint together and exit with :data:`EXIT_PREEMPTED`."""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped at a committed checkpoint; run again to resume

_received: list[int] = []


def _handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal API
    # A second signal (e.g. during the save) only appends: nothing is interrupted mid-write.
    _received.append(signum)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def requested() -> bool:
    return bool(_received)


class Preempted(Exception):
    """Raised after the stop checkpoint is committed; the entry point exits with 75."""
