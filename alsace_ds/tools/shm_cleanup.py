"""Remove the shared-memory buffers DeepSpeed's CPU all-reduce leaves in /dev/shm.

DeepSpeed's ``deepspeed_shm_comm`` op (CPU accelerator, started by the ``deepspeed``
launcher) creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
(~69 MB each) and never unlinks it. A rank unlinks its own at the end of a run
(:func:`unlink_own_buffer`); ``python -m alsace_ds.tools.shm_cleanup`` removes leftovers of
crashed runs that no live process still maps.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"


def own_buffer(rank: int) -> Path:
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return SHM / f"{PREFIX}{os.getuid()}_{addr}_{port}_{rank}"


def unlink_own_buffer(rank: int) -> bool:
    """Unlink this rank's buffer (mappings held by other ranks stay valid until they exit)."""
    try:
        own_buffer(rank).unlink()
        return True
    except OSError:
        return False


def remove_port(port: int | str, shm: Path = SHM) -> list[Path]:
    """Remove this user's buffers of the job on master port ``port`` (its ranks have exited
    or been killed; another job's buffers are never touched); returns what went."""
    gone = []
    for path in shm.glob(f"{PREFIX}{os.getuid()}_*_{port}_*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            gone.append(path)
    return gone


def _mapped_paths() -> set[str]:
    """Every /dev/shm path some live process maps or holds open."""
    held: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    held.add(line.split(None, 5)[-1].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    held.add(target)
        except OSError:
            continue
    return held


def remove_stale(shm: Path = SHM) -> list[Path]:
    """Remove this user's leftover buffers that no live process uses; returns what went."""
    held = _mapped_paths()
    removed = []
    for path in shm.glob(f"{PREFIX}{os.getuid()}_*"):
        if str(path) not in held:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


if __name__ == "__main__":
    gone = remove_stale()
    if gone:
        print(f"removed {len(gone)} stale DeepSpeed shm buffer(s) from {SHM}")
