"""`serve --watch NAME=RUN_DIR`: follow a training run, serving each checkpoint it publishes.

A watch only reads; it never writes in the run. Every `poll_s` it reads the checkpoint's small
adapter.json; when the checkpoint it names changes (its tensors' sha256 or its step), it reads
the checkpoint whole through the readers that never see a half-written one (a torn read is read
again, a swap in progress is read from its previous version) and hands it to the engine, which
puts it in between two decoding steps. A run that does not exist yet is waited for; a damaged
or vanished checkpoint leaves the last good version served, and `/health` says so.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

from ..checkpoints.adapter_dir import META_FILE, find_adapter_dir
from ..checkpoints.reading import read_adapter
from ..errors import CheckpointError
from ..runs import CHECKPOINTS, RunFolder
from .adapters import Served
from .engine import Engine

_STATUS_LOCK = threading.Lock()  # watches of several runs report into one dict


def checkpoint_folder(run_dir: str | Path, which: str) -> Path:
    """The folder a watch follows: RUN_DIR/<which>, or RUN_DIR itself when it is an adapter folder."""
    if which not in CHECKPOINTS:
        raise ValueError(f"--watch-which must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    run = Path(run_dir).expanduser()
    return run if (run / META_FILE).is_file() else RunFolder(run).checkpoint(which)


class Watch:
    def __init__(self, engine: Engine, name: str, run_dir: str | Path, which: str = CHECKPOINTS[0], poll_s: float = 0.5,
                 report: Callable[[str], None] = lambda message: None) -> None:
        self.engine, self.name, self.run_dir, self.poll_s, self.report = engine, name, str(run_dir), poll_s, report
        self.folder = checkpoint_folder(run_dir, which)
        self.loaded: Served | None = None
        self._seen: tuple | None = None
        self._status("waiting", f"waiting for {self.folder}")

    def check(self, at_start: bool = False) -> bool:
        """Load the checkpoint if it changed since the last look; whether a new version is served.

        `at_start` (before decoding runs, on its thread): the adapter goes straight into the set,
        and a checkpoint that cannot be served raises instead of being reported."""
        try:
            meta = json.loads((find_adapter_dir(self.folder) / META_FILE).read_bytes())
            key = (meta.get("adapter_sha256"), meta.get("step"))
        except (CheckpointError, OSError, ValueError, AttributeError):
            if self.loaded is None:
                self._status("waiting", f"waiting for {self.folder}")
            else:
                self._status("missing", f"{self.folder} is gone; serving {self.loaded.fingerprint}")
            return False
        if key == self._seen:
            return False
        self._seen = key  # a checkpoint that cannot be served is looked at again once it changes
        try:
            adapter = read_adapter(self.folder)
            self._seen = (adapter.meta.get("adapter_sha256"), adapter.meta.get("step"))

            def add() -> Served:
                return self.engine.adapters.add(self.name, adapter, replace_existing=True, watched=self.run_dir)

            served = add() if at_start else self.engine.call(add).result()
        except (CheckpointError, ValueError, OSError) as exc:  # damaged, or trained on another base model
            if at_start:
                raise
            self._failed(exc)
            return False
        self.loaded = served
        self._status("serving", f"serving {served.fingerprint} from {self.folder}")
        loss = f", val loss {served.val_loss:.4f}" if served.val_loss is not None else ""
        self.report(f"watch {self.name}: step {served.step}{loss} from {self.folder}")
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.check()
            stop.wait(self.poll_s)

    def _failed(self, exc: Exception) -> None:
        serving = f"serving {self.loaded.fingerprint}" if self.loaded else "nothing served yet"
        message = f"{' '.join(str(exc).split())}; {serving}"
        if self.engine.adapters.watching.get(self.name, {}).get("message") != message:
            self.report(f"watch {self.name}: {message}")
        self._status("error", message)

    def _status(self, status: str, message: str) -> None:
        entry = {"run": self.run_dir, "folder": str(self.folder), "status": status, "message": message,
                 "step": self.loaded.step if self.loaded else None,
                 "val_loss": self.loaded.val_loss if self.loaded else None, "checked_at": time.time()}
        with _STATUS_LOCK:
            self.engine.adapters.watching = {**self.engine.adapters.watching, self.name: entry}
