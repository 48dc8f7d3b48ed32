"""Everything the CLI shows: messages on stderr, progress bars, or plain lines off a terminal."""

from __future__ import annotations

import sys
import time

PROG = "lora-gpt2"


def say(message: str) -> None:
    """A diagnostic line on stderr (stdout is kept for results such as generated text)."""
    print(message, file=sys.stderr, flush=True)


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def error_line(message: str) -> str:
    return f"{PROG}: error: {one_line(message)}"


def is_terminal() -> bool:
    return sys.stderr.isatty()


class PlainProgress:
    """A progress report for logs: a line every `every` seconds and one at the end, no redraws."""

    def __init__(self, total: float | None, desc: str, unit: str = "", every: float = 10.0,
                 format_value=None) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0.0
        self.postfix = ""
        self._last = time.monotonic()
        self._format = format_value or (lambda v: f"{v:,.0f}")

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def _print(self) -> None:
        of = f" of {self._format(self.total)}" if self.total else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        say(f"{self.desc}: {self._format(self.n)}{of} {self.unit}{extra}".rstrip())

    def close(self) -> None:
        if self.n:
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: float | None, desc: str, unit: str = "it", bytes_: bool = False, initial: int = 0):
    """A tqdm bar on a terminal, plain log lines elsewhere."""
    if is_terminal():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="B" if bytes_ else unit, unit_scale=bytes_,
                    unit_divisor=1024 if bytes_ else 1000, initial=initial, dynamic_ncols=True,
                    file=sys.stderr)
    bar = PlainProgress(total, desc, "" if bytes_ else unit,
                        format_value=_human_bytes if bytes_ else None)
    bar.n = initial
    return bar


def _human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return str(value)


class LazyProgress:
    """A progress callback `(done, total)` whose bar appears only once there is work to show,
    so an up-to-date preparation prints nothing."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit = desc, unit
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress(total, self.desc, unit=self.unit)
        self.bar.update(done - self.bar.n)
        if done >= total:  # finished: its last line now, before what follows
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "LazyProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
