"""What the signals a cluster or a terminal sends mean to each command.

`train` treats SIGINT, SIGTERM, SIGHUP and SIGUSR1 as "checkpoint after this step, then stop"
(`StopOnSignals`). Every other command stops at once, but as an exception rather than a kill,
so that atomic writes remove their temporaries (`ExitOnSignals`): a SIGTERM during
`download-data`, `merge` or `export` leaves no `.tmp-*` file behind.
"""

from __future__ import annotations

import signal

from .output import say

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129, "SIGUSR1": 138}  # 128 + signal number


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP; a BaseException so no `except Exception`
    in the library swallows it, while `finally` blocks and atomic writes clean up."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.exit_code = SIGNAL_EXIT[name]


class StoppedAtOnce(BaseException):
    """A second Ctrl-C while `train` finished its step: it stops now, without saving that step.
    Not a KeyboardInterrupt, which typer turns into a silent exit 130 before `main` could say so."""


class _Handlers:
    SIGNALS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


class ExitOnSignals(_Handlers):
    """SIGTERM and SIGHUP raise `Terminated` (SIGINT already raises KeyboardInterrupt)."""

    SIGNALS = ("SIGTERM", "SIGHUP")

    def _handle(self, signum, frame) -> None:
        raise Terminated(signal.Signals(signum).name)


class StopOnSignals(_Handlers):
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's stop), SIGHUP (the terminal closed) and SIGUSR1
    (Slurm's --signal) all ask for the same thing: finish the step, checkpoint, stop. A second
    Ctrl-C stops at once."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None

    def requested(self) -> str | None:
        return self.reason

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and name == "SIGINT":
            raise StoppedAtOnce
        if self.reason is None:
            self.reason = name
            say(f"\n{name}: saving a checkpoint after this step"
                + (" (Ctrl-C again to stop at once)" if name == "SIGINT" else ""))
