"""A run folder has one owner: the process holding its lock. Only the owner recovers, cleans and writes.

The lock is an OS file lock (flock) on RUN/.lock, so the OS releases it when the owner dies,
however it dies: a SIGKILLed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import os
from pathlib import Path

from ..adapters import variants
from ..checkpoints import adapter_dir as checkpoint
from ..atomic import remove_stale_temps, write_text
from ..errors import CheckpointError, LoraGPT2Error, WriteError
from ..runs import CHECKPOINTS, RunFolder


class RunInUse(LoraGPT2Error):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held until `release` or process exit."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._fd: int | None = None
        self.created = False  # whether acquire made the folder

    def acquire(self) -> "RunLock":
        import fcntl

        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise WriteError(f"--out {self.out} is a file, not a folder") from None
        except OSError as exc:
            raise WriteError(f"cannot create run folder {self.out}: {exc.strerror or exc}") from None
        if not self.out.is_dir():
            raise WriteError(f"--out {self.out} is a file, not a folder")
        path = RunFolder(self.out).lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(f"cannot write in run folder {self.out}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise RunInUse(f"run folder {self.out} is in use by {who} (a training run holds its lock); "
                           "wait for it to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def abandon(self) -> None:
        """Release after a refused start: a folder that acquire made, and that still holds
        nothing but the lock, goes too, so a typo in --model leaves no empty run behind."""
        created = self.created and self._fd is not None
        if created and list(self.out.iterdir()) == [RunFolder(self.out).lock]:
            with contextlib.suppress(OSError):
                RunFolder(self.out).lock.unlink()
                self.out.rmdir()
        self.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def recover(out: Path) -> None:
    """For the lock holder: finish or undo interrupted checkpoint swaps, drop stale temporaries."""
    for name in CHECKPOINTS:
        checkpoint.recover_checkpoint(RunFolder(out).checkpoint(name))
    remove_stale_temps(out)


def existing_step(out: Path) -> int | None:
    """The step of the run already in `out` (its last/ checkpoint), if any. Call after `recover`."""
    meta = RunFolder(out).last / checkpoint.META_FILE
    if not meta.is_file():
        return None
    try:
        step = json.loads(meta.read_text()).get("step", 0)
        return step if isinstance(step, int) else 0
    except (ValueError, json.JSONDecodeError, AttributeError):
        return 0


def clear_orphans(out: Path) -> None:
    """A new run in a folder whose earlier run never checkpointed: its metrics and plot go."""
    for path in RunFolder(out).orphans:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def read_run_config(out: Path) -> dict | None:
    path = RunFolder(out).config
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON; the run cannot be resumed from it") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a run config (a JSON object)")
    if isinstance(saved.get("model"), dict):
        saved["model"] = variants.upgrade(saved["model"])
    return saved


def write_run_config(out: Path, config_dict: dict) -> None:
    write_text(RunFolder(out).config, json.dumps(config_dict, indent=2) + "\n")
