"""Writing files whole or not at all: every output of deepshrink goes through ``atomic_write``."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from .errors import WriteError


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path`` and rename it into place on success.

    The temp file is ``.NAME.XXXX.tmp`` in the same folder (a rename within one file system is
    atomic); it is removed on any failure, and ``run_recipe(resume=True)`` sweeps any a killed
    process left behind.

    Raises:
        WriteError: an ``OSError`` while creating, writing, syncing or renaming (ENOSPC, EIO, EXDEV...),
            naming the path and the cause. Other exceptions from ``write`` propagate unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):  # the disk that failed the write may fail this too
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            code = errno.errorcode.get(e.errno, "") if e.errno else ""
            raise WriteError(f"cannot write {path}: {e.strerror or e}{f' [{code}]' if code else ''}; "
                             "no partial file was left") from e
        raise
    return path


TEMP_GLOB = ".*.tmp"  # what atomic_write's temp files look like


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files a killed ``atomic_write`` left anywhere under ``folder``; returns them."""
    removed = []
    for tmp in Path(folder).rglob(TEMP_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
