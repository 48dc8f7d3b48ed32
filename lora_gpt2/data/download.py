"""Fetch a text file like a package manager would: timeouts, retries, checksum, atomic rename.

What lands at `dest` is always a complete, verified UTF-8 text: a binary body, a checksum
mismatch, a server that trickles past the deadline, or a signal leaves the previous file
(or none) and no temporary.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import atomic_open, remove_dead_temps
from ..errors import DownloadError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CHUNK = 1 << 16

# progress(bytes_just_received, total_bytes_or_None)
Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff: float = 1.0  # seconds before the 2nd attempt; doubles each time
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # silence between two packets
    deadline: float = 1800.0  # the whole download, all attempts: a trickling server is given up on


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 5xx, short body)."""


class _Body:
    """Where the received bytes go: the file, its sha256, a UTF-8 check, the progress callback,
    and the overall deadline, all fed one block at a time."""

    def __init__(self, url: str, out, progress: Progress | None, deadline_at: float,
                 deadline: float) -> None:
        self.url, self.out, self.progress = url, out, progress
        self.deadline_at, self.deadline = deadline_at, deadline
        self.restart()

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.digest = hashlib.sha256()
        self.text = codecs.getincrementaldecoder("utf-8")()
        self.received = 0

    def add(self, block: bytes, total: int | None) -> None:
        self._check_text(block)
        self.out.write(block)
        self.digest.update(block)
        self.received += len(block)
        if self.progress:
            self.progress(len(block), total)
        self.check_deadline()

    def finish(self) -> str:
        if self.received == 0:
            raise DownloadError(f"{self.url} is empty; nothing was saved")
        self._check_text(b"", final=True)
        return self.digest.hexdigest()

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline_at:
            raise DownloadError(
                f"download of {self.url} gave up after {self.deadline:g} s (the --timeout) with "
                f"{self.received:,} bytes received; the server is too slow or stalled"
            )

    def _check_text(self, block: bytes, final: bool = False) -> None:
        at = block.find(b"\x00")
        if at >= 0:
            raise DownloadError(f"{self.url} is binary (a NUL byte at offset {self.received + at}), "
                                "not UTF-8 text; nothing was saved")
        pending = len(self.text.getstate()[0])  # bytes of a character split across blocks
        try:
            self.text.decode(block, final=final)
        except UnicodeDecodeError as exc:
            raise DownloadError(f"{self.url} is not UTF-8 text (invalid byte at offset "
                                f"{self.received - pending + exc.start}); nothing was saved") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_valid_copy(path: Path, sha256: str | None) -> bool:
    """An existing, complete copy: the checksum matches, or (with none to check) it is non-empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    return sha256 is None or sha256_of(path) == sha256


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    policy: RetryPolicy = RetryPolicy(),
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Download `url` to `dest`, replacing it only once complete and verified."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DownloadError(f"unsupported URL {url!r}: use http, https or file://")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create data directory {dest.parent}: {exc.strerror or exc}") from None
    if not os.access(dest.parent, os.W_OK):
        raise DownloadError(f"data directory {dest.parent} is not writable")
    remove_dead_temps(dest)  # left by a download that was SIGKILLed
    try:
        with atomic_open(dest, "wb") as out:
            body = _Body(url, out, progress, time.monotonic() + policy.deadline, policy.deadline)
            digest = _copy_with_retries(url, body, policy, sleep)
            if sha256 is not None and digest != sha256:
                raise DownloadError(
                    f"checksum mismatch for {url}: got sha256 {digest}, expected {sha256}"
                )
    except PermissionError as exc:
        raise DownloadError(f"cannot write {dest}: {exc.strerror}") from None


def _copy_with_retries(url, body: _Body, policy: RetryPolicy, sleep) -> str:
    last = ""
    for attempt in range(policy.attempts):
        if attempt:
            wait = min(policy.backoff * 2 ** (attempt - 1), max(0.0, body.deadline_at - time.monotonic()))
            sleep(wait)
            body.check_deadline()
            body.restart()
        try:
            if url.startswith("file:"):
                _copy_file(url, body)
            else:
                _copy_http(url, body, policy)
            return body.finish()
        except _Retryable as exc:
            last = str(exc)
    raise DownloadError(f"download of {url} failed after {policy.attempts} attempts: {last}")


def _copy_file(url: str, body: _Body) -> None:
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    try:
        with open(path, "rb") as src:
            total = os.fstat(src.fileno()).st_size
            for block in iter(lambda: src.read(CHUNK), b""):
                body.add(block, total)
    except FileNotFoundError:
        raise DownloadError(f"{url}: no such file") from None
    except IsADirectoryError:
        raise DownloadError(f"{url}: is a directory, not a file") from None


def _copy_http(url: str, body: _Body, policy: RetryPolicy) -> None:
    import requests

    try:
        with requests.get(
            url, stream=True, timeout=(policy.connect_timeout, policy.read_timeout)
        ) as response:
            status = response.status_code
            if 500 <= status < 600:
                raise _Retryable(f"HTTP {status}")
            if status >= 400:
                raise DownloadError(f"download of {url} failed: HTTP {status} {response.reason}")
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            # read1: whatever has arrived (at most one socket read), so the deadline is checked
            # however slowly bytes trickle in. The checksum is of the file, so a gzip transfer
            # encoding is undone; the length check counts the bytes on the wire (raw.tell()),
            # which Content-Length describes.
            while block := response.raw.read1(CHUNK, decode_content=True):
                body.add(block, total)
            received = response.raw.tell()
            if total is not None and received < total:
                raise _Retryable(f"body shorter than Content-Length ({received} of {total} bytes)")
    except requests.exceptions.ConnectionError as exc:
        raise _Retryable(_reason(exc, "connection failed")) from None
    except requests.exceptions.Timeout:
        raise _Retryable("timed out") from None
    except requests.exceptions.RequestException as exc:
        raise _Retryable(_reason(exc, "request failed")) from None
    except _incomplete_read_errors() as exc:
        raise _Retryable(f"connection dropped mid-body ({type(exc).__name__})") from None


def _incomplete_read_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import urllib3.exceptions

    return (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError)


def _reason(exc: Exception, fallback: str) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Connection reset",
                   "Connection aborted", "IncompleteRead", "Read timed out"):
        if marker in text:
            return marker.lower() if marker != "IncompleteRead" else "connection dropped mid-body"
    return fallback
