"""A served tiny base model with two adapters, shared by the serve tests: the server runs in a
thread on 127.0.0.1, and each adapter's own model is kept as the reference."""

import contextlib
import socket
import threading
import time

import pytest

from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2 import load_pretrained, tokenizer
from lora_gpt2.checkpoints.reading import read_adapter
from lora_gpt2.inference.bank import AdapterBank
from lora_gpt2.config import LoRAConfig
from lora_gpt2.inference.sampling import SamplingConfig
from lora_gpt2.inference.session import generate

from helpers import make_hf_model, randomize_adapters, save_hf_model

KEY = "sk-test-key"
BODY_TIMEOUT_S = 3.0  # short, so the slow-client test ends quickly
ADAPTERS = {"poems": LoRAConfig(targets=("attn", "lm_head"), r=4, alpha=8.0),
            "plays": LoRAConfig(targets=("ffn",), r=2, alpha=2.0)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base model folder, two adapter folders and each adapter's own model (the reference)."""
    root = tmp_path_factory.mktemp("serve")
    base = save_hf_model(make_hf_model(seed=8, n_positions=512), root / "tiny-base")  # room for long requests
    singles = {None: load_pretrained(base, lora=LoRAConfig(targets=())).eval()}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        model = randomize_adapters(load_pretrained(base, lora=config).eval(), seed=20 + i, scale=0.1)
        checkpoint.save_checkpoint(root / "adapters" / name, model, None, step=1)
        singles[name] = model
    return base, root / "adapters", singles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(engine, **settings):
    """The app over `engine` on a free port of 127.0.0.1, in a thread: yields its base URL."""
    import uvicorn

    from lora_gpt2.serve.app import ServeSettings, create_app
    from lora_gpt2.serve.protocol import server_config

    port = free_port()
    app = create_app(engine, ServeSettings("tiny-base", KEY, body_timeout_s=BODY_TIMEOUT_S, **settings))
    srv = uvicorn.Server(server_config(app, "127.0.0.1", port, BODY_TIMEOUT_S))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def base_engine(base, max_batch=4):
    """An engine over the bare base model (the caller adds adapters and stops it)."""
    from lora_gpt2.serve.engine import Engine

    bank = AdapterBank(load_pretrained(base, lora=LoRAConfig(targets=())).eval())
    return Engine(bank, max_batch=max_batch, base_name="tiny-base")


@pytest.fixture(scope="module")
def server(world):
    base, adapters, _ = world
    engine = base_engine(base)
    for name in ADAPTERS:
        engine.adapters.add(name, read_adapter(adapters / name))
    engine.start()
    try:
        with running_server(engine) as url:
            yield url, engine
    finally:
        engine.stop()


def greedy_text(singles, name, prompt, n):
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(list(generate(singles[name], ids, SamplingConfig(max_new_tokens=n, temperature=0))))
