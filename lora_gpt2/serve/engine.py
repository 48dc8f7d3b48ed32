"""The decoding loop: jobs come in through a queue, tokens go out through each job's sink.

The HTTP layer never touches the model: it submits a job and reads what the sink delivers
(`call_soon_threadsafe` onto an asyncio queue). A job cancelled by its client (a closed
stream) leaves the batch before the next step.

`run()` decodes on the calling thread; `serve` calls it on the thread that loaded the model, with
HTTP on another. Torch's OpenMP keeps one thread team per calling thread: a second team (load on
one thread, decode on another) leaves idle workers spinning against the busy ones, which cost a
2-core CPU a quarter of its decoding speed. `start()` runs the loop on a thread of its own.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import allocator
from ..inference.bank import AdapterBank
from ..inference.decoding import Decoder, Sequence
from ..inference.sampling import SamplingConfig
from .adapters import Served, ServedAdapters

# sink(kind, value): ("token", (id, logprob, top)), ("end", finish_reason) or ("error", message)
Sink = Callable[[str, Any], None]


@dataclass(eq=False)
class Job:
    prompt: list[int]
    adapter: str | None
    cfg: SamplingConfig
    seed: int | None
    logprobs: int | None
    sink: Sink
    sequence: Sequence | None = field(default=None, repr=False)
    served: Served | None = None  # the adapter version it decodes with, set when it joins


class Engine:
    def __init__(self, bank: AdapterBank, max_batch: int = 16, base_name: str = "", force: bool = False,
                 kv_layout: str = "paged") -> None:
        self.decoder = Decoder(bank.model, bank, max_batch, kv_layout)
        self.bank = bank
        self.adapters = ServedAdapters(bank, base_name, force)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[Sequence, Job] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Engine":
        """Decode on a new thread (tests, and programs that keep their own main thread)."""
        self._thread = threading.Thread(target=self.run, name="lora-gpt2-decoder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop after its current step (callable from any thread)."""
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, *jobs: Job) -> None:
        """Queue jobs that join together: one request's choices. They are one item of the inbox,
        so an adapter change (`call`, which a watcher's thread makes at any time) lands before or
        after all of them, and every choice decodes with the same version."""
        self._inbox.put(("submit", jobs))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the decoding thread between two steps (changes to the adapter set)."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        if self._stopping.is_set():
            future.set_exception(RuntimeError("the server is stopping"))
        return future

    @property
    def kv(self):
        """The batch's KV cache (inference/kv.py): its layout, tokens, blocks and bytes."""
        return self.decoder.kv

    @property
    def running(self) -> int:
        return len(self.decoder.active)

    @property
    def waiting(self) -> int:
        return len(self.decoder.waiting)

    @property
    def active(self) -> int:
        """Sequences in the batch or waiting for it (read from another thread: a snapshot)."""
        return len(self.decoder.active) + len(self.decoder.waiting)

    def run(self) -> None:
        """Decode on this thread until `stop()`."""
        while not self._stopping.is_set():
            self._take_inbox(wait=not self.decoder.busy)
            if not self.decoder.busy:
                continue
            prefills = self.decoder.prefills
            try:
                events = self.decoder.step()
                if self.decoder.prefills != prefills:  # blocks of a new prompt length were freed
                    allocator.trim()
                if self.adapters.retired:
                    self._collect()
            except Exception as exc:  # noqa: BLE001 - e.g. non-finite logits: every job in the batch fails
                self._fail_all(" ".join(str(exc).split()))
                continue
            for sequence, token in events:
                job = self._jobs.get(sequence)
                if job is None:
                    continue
                if token is None:
                    del self._jobs[sequence]
                    if sequence.finish_reason == "error":
                        self._deliver(job, "error", sequence.error)
                    else:
                        self._deliver(job, "end", sequence.finish_reason)
                else:
                    top = sequence.top_logprobs[-1] if sequence.logprobs is not None else None
                    lp = sequence.token_logprobs[-1] if sequence.logprobs is not None else None
                    self._deliver(job, "token", (token, lp, top))

    def _deliver(self, job: Job, kind: str, value: Any) -> None:
        """Hand an event to the job's sink; a sink that cannot take it (its event loop has closed:
        the server was stopped at once) ends the job instead of the decoding loop."""
        try:
            job.sink(kind, value)
        except RuntimeError:
            if job.sequence is not None and self._jobs.pop(job.sequence, None) is not None:
                self.decoder.cancel(job.sequence)

    def _take_inbox(self, wait: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = item
            if kind == "submit":  # one item: no change to the set can land between its jobs
                for one in job:
                    try:
                        one.served = self.adapters.resolve(one.adapter)
                        key = one.served.key if one.served else None
                        one.sequence = self.decoder.submit(one.prompt, key, one.cfg, one.seed, one.logprobs)
                        self._jobs[one.sequence] = one
                    except ValueError as exc:
                        self._deliver(one, "error", str(exc))
            elif kind == "call":
                fn, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn()
                        if self.adapters.retired:  # what a change retired, unused, is freed before it is done
                            self._collect()
                    except Exception as exc:  # noqa: BLE001 - the caller's to report
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            elif kind == "cancel" and job.sequence is not None and job.sequence in self._jobs:
                del self._jobs[job.sequence]
                self.decoder.cancel(job.sequence)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                if self.adapters.retired:  # a cancel or a change may have freed a version
                    self._collect()
                return

    def _collect(self) -> None:
        in_use = {s.adapter for s in (*self.decoder.active, *self.decoder.waiting)}
        self.adapters.collect(in_use)

    def _fail_all(self, message: str) -> None:
        for sequence, job in list(self._jobs.items()):
            self.decoder.cancel(sequence)
            self._deliver(job, "error", message)
        self._jobs.clear()
