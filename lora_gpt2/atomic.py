"""Atomic file writes: a temporary name in the same folder, fsync, then rename.

A crash at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

from .errors import WriteError

TMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    return path.with_name(f"{TMP_MARK}{os.getpid()}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that opens files itself (the gguf package);
    on success the file written there is synced and replaces `path`, on error it goes."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            # a failed write() names no file: say which one, and that the old one is intact
            reason = str(exc.strerror or exc)
            raise WriteError(f"cannot write {path}: {reason}; "
                             f"{'the previous file is intact' if path.exists() else 'nothing was written'}",
                             reason) from None
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it goes."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete temporaries that a killed process left behind; return what was removed."""
    removed = []
    for tmp in Path(directory).glob(f"{TMP_MARK}*"):
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed


def remove_dead_temps(path: Path) -> list[Path]:
    """Delete the temporaries of `path` (`.tmp-<pid>-NAME`) whose writer is no longer running.

    For files that have no lock holder to clean up after a SIGKILL (downloads, prepared
    data): a live writer's temporary is left alone, so two processes never race on it.
    """
    removed = []
    for tmp in path.parent.glob(f"{TMP_MARK}*-{path.name}"):
        pid = tmp.name[len(TMP_MARK):-len(path.name) - 1]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fsync_dir(directory: Path) -> None:
    # The rename is durable only once the folder itself is synced (POSIX).
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
