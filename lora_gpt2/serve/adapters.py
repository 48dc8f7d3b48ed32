"""The adapters a server answers for, by name, changeable while it decodes.

A name points at one version of an adapter: a slot of the bank under a key of its own
(`name` + NUL + version: no name a client sends can hold NUL). Loading a new version under a
name (a watched run's new checkpoint) or unloading it retires the old version rather than
removing it: requests already decoding with it finish on it, new requests get the new set at
once, and a retired version leaves the bank when no sequence uses it (`collect`).

Every method that changes the set runs on the decoding thread, between two steps (the engine's
`call`); readers on other threads see `current`, which is replaced whole, never edited.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..chat_template import ChatTemplate
from ..checkpoints.reading import Adapter
from ..inference.bank import AdapterBank

MAX_NAME = 256
_NAME = re.compile(r"^[^\x00-\x1f\x7f]+$")


@dataclass(frozen=True)
class Served:
    """One version of an adapter as served: what /v1/models, /health and responses report."""

    name: str
    key: str  # the bank's name for this version
    path: str
    version: int
    step: int | None = None
    val_loss: float | None = None
    watched: str | None = None  # the run folder it follows (--watch), if any
    template: ChatTemplate = field(default_factory=ChatTemplate, repr=False)  # how chat requests are rendered

    @property
    def fingerprint(self) -> str:
        """Which version answered: OpenAI's `system_fingerprint` of a response."""
        return f"{self.name}@step-{self.step}" if self.step is not None else f"{self.name}@v{self.version}"

    def describe(self) -> dict:
        return {"path": self.path, "version": self.version, "step": self.step, "val_loss": self.val_loss,
                "watched": self.watched, "chat_template": "default" if self.template.is_default else
                self.template.sha256}


def check_name(name: object, base_name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not _NAME.match(name):
        raise ValueError(f"an adapter name must be 1 to {MAX_NAME} printable characters, got {str(name)[:80]!r}")
    if name == base_name:
        raise ValueError(f"adapter name {name!r} is the base model's name; choose another")
    return name


@dataclass
class ServedAdapters:
    bank: AdapterBank
    base_name: str
    force: bool = False  # serve adapters whose base fingerprint differs (serve --force)
    current: dict[str, Served] = field(default_factory=dict)
    retired: list[Served] = field(default_factory=list)
    # what each --watch follows and how it stands (written whole by the watcher, read by /health)
    watching: dict[str, dict] = field(default_factory=dict)
    _versions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # adapters put into the bank before the server was made are served under their bank names
        for name in self.bank.loaded:
            self.current[name] = Served(name, name, "", 1)
            self._versions[name] = 1

    def add(self, name: str, adapter: Adapter, *, replace_existing: bool = False, watched: str | None = None) -> Served:
        """Serve `adapter` as `name`; with `replace_existing`, as the new version of a served name."""
        check_name(name, self.base_name)
        old = self.current.get(name)
        if old is not None and not replace_existing:
            raise ValueError(f"the adapter name {name!r} is taken; unload it first or choose another")
        version = self._versions.get(name, 0) + 1
        served = Served(name, f"{name}\x00{version}", str(adapter.path), version, _step(adapter), _val_loss(adapter),
                        watched, adapter.chat_template)
        self.bank.add_adapter(served.key, adapter, force=self.force)  # refuses a misfit: the set is unchanged
        self._versions[name] = version
        if old is not None:
            self.retired.append(old)
        self.current = {**self.current, name: served}
        return served

    def remove(self, name: str) -> Served:
        if name not in self.current:
            raise KeyError(name)
        gone = self.current[name]
        self.retired.append(gone)
        self.current = {n: s for n, s in self.current.items() if n != name}
        return gone

    def resolve(self, name: str | None) -> Served | None:
        """The version a request for `name` gets now (None: the base model)."""
        if name is None:
            return None
        if name not in self.current:
            raise ValueError(f"unknown adapter {name!r}")
        return self.current[name]

    def collect(self, in_use: set[str | None]) -> None:
        """Free the retired versions no sequence uses any more."""
        still = []
        for served in self.retired:
            if served.key in in_use:
                still.append(served)
            else:
                self.bank.remove(served.key)
        self.retired = still


def _step(adapter: Adapter) -> int | None:
    step = adapter.meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _val_loss(adapter: Adapter) -> float | None:
    loss = adapter.meta.get("val_loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return None
    return float(loss)
