"""Fixtures: tiny random GPT-2 checkpoints, prepared sample text, the in-process CLI."""

from __future__ import annotations

import os

import pytest

from helpers import SAMPLE_TEXT, make_hf_model, save_hf_model

pytest_plugins = ["serving"]  # the serve tests' world and server fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The suite's own lora-gpt2 cache (children inherit it): nothing lands in the user's."""
    os.environ["LORA_GPT2_CACHE"] = str(tmp_path_factory.mktemp("lora-gpt2-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(directory, HF model) of a tiny GPT-2 with the full 50257-token vocabulary."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    model = make_hf_model()
    return save_hf_model(model, directory), model


@pytest.fixture(scope="session")
def small_vocab_checkpoint(tmp_path_factory):
    """A tiny GPT-2 with a 128-token vocabulary: the fastest model that still is GPT-2."""
    directory = tmp_path_factory.mktemp("tiny-vocab")
    model = make_hf_model(vocab_size=128, n_positions=32)
    return save_hf_model(model, directory), model


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in-process: returns (exit code, stdout, stderr); `input_text` is its stdin."""
    import io
    import sys

    from lora_gpt2.cli import main

    def run(*args: str, input_text: str | None = None):
        capsys.readouterr()
        if input_text is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(input_text.encode()), encoding="utf-8"))
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """A folder holding input.txt, with its token files prepared."""
    from lora_gpt2.data import ensure_prepared

    d = tmp_path_factory.mktemp("text")
    (d / "input.txt").write_text(SAMPLE_TEXT)
    ensure_prepared(d)
    return d
