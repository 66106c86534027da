"""The real entry point (``alsace_ds/train.py``) with one change, for tests of a run
interrupted at a dev check, at points named ``<stage>@<optimizer step>`` (``stage0@4``: the
check after step 4 of stage 0):

- ``$ALSACE_TEST_STOP_IN_CHECKS``: rank 0 sends itself SIGUSR1 (the product's own handler: a
  stop request, as Slurm's ``--signal`` gives) as each named check begins. The check's first
  poll (before its first batch) sees the request on every rank, so the stop is inside that
  check, always.
- ``$ALSACE_TEST_KILL_AFTER_CHECKS``: rank 0 SIGKILLs every process of the job (launcher and
  ranks: those carrying the test harness's job tag, ``alsace_ds.tools.procs.TAG_VAR``) as soon
  as the named check has ended, its outputs on disk, before the next step: what a node
  failure right after a dev check does, at exactly that point.

Each named point interrupts the run once over all its attempts (those used are listed in
``<run dir>/interrupts.done``, so the check redone on resume runs to its end).

Run exactly like ``train.py``: ``torchrun --nproc_per_node N tests/_interrupt_at_check.py ...``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alsace_ds.recipes import loop  # noqa: E402
from alsace_ds.tools import procs  # noqa: E402


def _points(var: str) -> set[str]:
    return set(filter(None, os.environ.get(var, "").split(",")))


STOP_IN, KILL_AFTER = (
    _points("ALSACE_TEST_STOP_IN_CHECKS"),
    _points("ALSACE_TEST_KILL_AFTER_CHECKS"),
)
_product_after_dev = loop.after_dev


def _first_time(run, key: str) -> bool:
    """True (and recorded) the first time ``key`` is met over the run's attempts (rank 0)."""
    done_file = run.run_dir / "interrupts.done"
    done = set(done_file.read_text().split()) if done_file.is_file() else set()
    if key in done:
        return False
    done_file.write_text(" ".join(sorted(done | {key})) + "\n")
    return True


def after_dev(run, engine, tok, stage, roles, on_dev):
    key = f"{stage}@{engine.global_steps}"
    if run.ctx.is_main and key in STOP_IN and _first_time(run, "stop-in-" + key):
        os.kill(os.getpid(), signal.SIGUSR1)
    ends_stage = _product_after_dev(run, engine, tok, stage, roles, on_dev)
    if run.ctx.is_main and key in KILL_AFTER and _first_time(run, "kill-after-" + key):
        for pid in procs.tagged(os.environ[procs.TAG_VAR]):
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return ends_stage


loop.after_dev = after_dev  # train_loop looks it up at call time

if __name__ == "__main__":
    from alsace_ds.train import main

    sys.exit(main())
