"""`lora-gpt2 serve`: one base model, many adapters, OpenAI's completions API (serve/)."""

from __future__ import annotations

import importlib.util
import signal
import socket
import time
from pathlib import Path
from typing import Optional

import typer

from ..runs import CHECKPOINTS
from .app import app
from .output import say
from .use_cmd import check_quantize

Opt = typer.Option
SERVE_HINT = "pip install 'lora-gpt2[serve]'"


def _named(specs: list[str], folder: Optional[Path]) -> dict[str, str]:
    """NAME=PATH pairs, and every adapter folder inside `folder` named after itself."""
    from ..checkpoints.adapter_dir import META_FILE
    from ..checkpoints.peft import CONFIG_FILE as PEFT_CONFIG
    from ..runs import RunFolder

    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter must be NAME=PATH, got {spec!r}")
        if name in named:
            raise ValueError(f"--adapter name {name!r} is given twice")
        named[name] = path
    if folder is not None:
        if not folder.is_dir():
            raise ValueError(f"--adapters {folder} is not a folder")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if RunFolder(sub).holds_checkpoints() or any((sub / f).exists() for f in (META_FILE, PEFT_CONFIG)):
                if sub.name in named:
                    raise ValueError(f"adapter name {sub.name!r} is given twice (--adapter and --adapters)")
                named[sub.name] = str(sub)
    return named


@app.command("serve")
def serve_cmd(
    model: Optional[str] = Opt(None, help="Base GPT-2 (default: the first adapter's base model)."),
    adapter: Optional[list[str]] = Opt(None, "--adapter", metavar="NAME=PATH",
                                       help="An adapter to serve as model NAME: a run, adapter or PEFT folder "
                                            "(repeatable)."),
    adapters: Optional[Path] = Opt(None, help="Serve every adapter folder inside this folder, named after it."),
    host: str = Opt("127.0.0.1", help="Address to bind (0.0.0.0 makes it reachable from other machines)."),
    port: int = Opt(8000, min=0, max=65535, help="Port to bind."),
    api_key: Optional[str] = Opt(None, envvar="LORA_GPT2_API_KEY",
                                 help="Require 'Authorization: Bearer KEY' (env LORA_GPT2_API_KEY)."),
    max_batch: int = Opt(16, min=1, help="Requests decoded together at most; more wait their turn."),
    kv_cache: str = Opt("paged", "--kv-cache", help="paged: blocks of one pool shared by the batch, one attention "
                                                    "call per layer; rows: a cache per request, reserved for all "
                                                    "its tokens, attended to one request at a time."),
    dtype: str = Opt("auto", help="auto, float32, bfloat16, float16 (CUDA)."),
    quantize: str = Opt("none", help="The base model's linear weights as none (float) or int8 (weight-only, a "
                                     "scale per output channel); adapters stay float, applied per row."),
    device: str = Opt("auto", help="auto, cpu, cuda or mps."),
    force: bool = Opt(False, "--force", help="Serve adapters even if their base model's fingerprint differs."),
    grace: float = Opt(30.0, min=0.0, help="On SIGTERM or Ctrl-C, seconds in-flight requests may take to finish."),
    watch: Optional[list[str]] = Opt(None, "--watch", metavar="NAME=RUN_DIR",
                                     help="Follow a training run: serve its checkpoint as NAME and load each new one "
                                          "it publishes; a run not started yet is waited for (repeatable)."),
    watch_which: str = Opt(CHECKPOINTS[0], "--watch-which", help="The checkpoint a watch serves: best or last."),
    allow_runtime_adapters: bool = Opt(False, "--allow-runtime-adapters",
                                       help="Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
                                            "API); the API key, if set, applies."),
) -> None:
    """Answer OpenAI-style completions for the base model and each adapter, batched together."""
    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "prometheus_client")):
        raise ValueError(f"serve needs FastAPI, uvicorn and prometheus_client: {SERVE_HINT}")
    from ..inference.kv import LAYOUTS
    from ..serve.app import ServeSettings

    if kv_cache not in LAYOUTS:
        raise ValueError(f"--kv-cache must be one of {', '.join(LAYOUTS)}, got {kv_cache!r}")
    check_quantize(quantize)
    named = _named(adapter or [], adapters)
    watched = _watched(watch or [], watch_which, named)
    with _bind(host, port) as sock:  # before loading anything: a taken port is known at once
        bank, base_name, read, weights = _load(model, named, dtype, device, watched, quantize)
        engine = _engine(bank, base_name, read, max_batch, force, kv_cache)
        watches = _start_watches(engine, watched, watch_which)
        settings = ServeSettings(base_name, api_key, allow_runtime_adapters=allow_runtime_adapters, weights=weights)
        _run(engine, settings, sock, max_batch, grace, watches)


def _watched(specs: list[str], which: str, named: dict[str, str]) -> dict[str, Path]:
    from ..serve.watch import checkpoint_folder

    watched: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--watch must be NAME=RUN_DIR, got {spec!r}")
        if name in watched or name in named:
            raise ValueError(f"adapter name {name!r} is given twice")
        checkpoint_folder(path, which)  # a wrong --watch-which is named before anything loads
        watched[name] = Path(path)
    return watched


def _load(model: Optional[str], named: dict[str, str], dtype: str, device: str, watched: dict[str, Path],
          quantize: str = "none"):
    """The base model in its decode-time layout in an (empty) bank, and every named adapter read."""
    from ..checkpoints.reading import read_adapter
    from ..inference.bank import AdapterBank
    from ..inference.layouts import DecodeLayout
    from ..config import LoRAConfig
    from ..devices import pick_device, resolve_dtype
    from ..checkpoints.hf import load_pretrained

    read = {name: read_adapter(path) for name, path in named.items()}
    base = model or next((a.base_model for a in read.values() if a.base_model), "") or _watched_base(watched)
    if not base:
        raise ValueError("no base model: pass --model (or an adapter, or a watched run with a checkpoint, "
                         "that names its base)")
    device_ = pick_device(device)
    net = load_pretrained(base, lora=LoRAConfig(targets=()), dtype=resolve_dtype(dtype, device_), device=device_)
    layout = DecodeLayout(net.eval(), quantize)
    layout.install()  # for the server's lifetime: the process ends with it
    bank = AdapterBank(net)
    base_name = Path(base).name if Path(base).exists() else base
    return bank, base_name, read, layout.describe()


def _watched_base(watched: dict[str, Path]) -> str:
    from ..checkpoints.adapter_dir import read_adapter_info
    from ..errors import CheckpointError

    for run in watched.values():
        try:
            return read_adapter_info(run).base_model
        except CheckpointError:  # not started yet: waited for
            continue
    return ""


def _start_watches(engine, watched: dict[str, Path], which: str) -> list:
    """A watch per run; a run that has a checkpoint already is served from the start (and one
    trained on another base model is refused here, by name)."""
    from ..checkpoints.adapter_dir import find_adapter_dir
    from ..errors import CheckpointError
    from ..serve.watch import Watch

    watches = []
    for name, run in watched.items():
        w = Watch(engine, name, run, which, report=say)
        try:
            find_adapter_dir(w.folder)
        except CheckpointError:
            say(f"watch {name}: waiting for {w.folder}")
        else:
            w.check(at_start=True)
        watches.append(w)
    return watches


def _engine(bank, base_name: str, read: dict, max_batch: int, force: bool, kv_cache: str):
    from ..serve.engine import Engine

    engine = Engine(bank, max_batch, base_name=base_name, force=force, kv_layout=kv_cache)
    for name, found in read.items():
        engine.adapters.add(name, found)  # on this thread, before decoding starts
    return engine


def _run(engine, settings, sock: socket.socket, max_batch: int, grace: float, watches: list) -> None:
    import threading

    import uvicorn

    from ..serve.app import create_app
    from ..serve.protocol import server_config

    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(server_config(create_app(engine, settings), host, port, settings.body_timeout_s))
    failed: list[BaseException] = []

    def http() -> None:  # uvicorn on its own thread; decoding stays on this one, which loaded the model
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - e.g. the port is taken: reported below
            failed.append(exc)
        finally:
            engine.stop()

    forced = threading.Event()
    cut: list[int] = []  # completions unfinished when the server stopped at once

    def stop_now() -> None:  # the HTTP thread is not waited for: it ends with the process
        if not forced.is_set():
            cut.append(engine.active)
            forced.set()
            engine.stop()

    timer = threading.Timer(grace, stop_now)
    timer.daemon = True

    def drain(*_) -> None:  # stop accepting, let in-flight requests finish for up to `grace` seconds
        if server.should_exit:  # a second Ctrl-C or SIGTERM: stop now
            stop_now()
        else:
            server.should_exit = True
            timer.start()

    previous = {s: signal.signal(s, drain) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="lora-gpt2-http", daemon=True)
    thread.start()
    watching = threading.Event()
    for w in watches:
        threading.Thread(target=w.run, args=(watching,), name=f"lora-gpt2-watch-{w.name}", daemon=True).start()
    try:
        while not server.started and thread.is_alive():
            time.sleep(0.02)
        if server.started:
            served = ", ".join(engine.adapters.current) or "no adapters"
            weights = "" if settings.weights["format"] == "none" else f", weights {settings.weights['format']}"
            say(f"serving {settings.base_name} + {served}{weights} on http://{host}:{port}/v1 (Ctrl-C or SIGTERM "
                f"stops, after in-flight requests finish, up to {grace:g} s)")
            engine.run()
        if not forced.is_set():
            thread.join()
    finally:
        watching.set()
        timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if (failed or not server.started) and not forced.is_set():
        raise ValueError(f"the server on {host}:{port} failed: {failed[0] if failed else 'it did not start'}")
    say(f"stopped; {cut[0]} unfinished completion(s) cut off" if cut and cut[0] else "stopped")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that a taken port or a wrong address is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
