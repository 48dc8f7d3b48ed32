"""Shared fixtures: tiny random GPT-2 checkpoints written in the real Hugging Face format."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)


def make_hf_model(seed: int = 0, **overrides):
    """A random GPT2LMHeadModel with every tensor perturbed, so nothing hides behind its init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**{**TINY, **overrides})
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def save_hf_model(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


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


SAMPLE_TEXT = "".join(
    f"{name}:\nWhat say you, {other}? The {n}th hour comes, and with it {thing}.\n\n"
    for n, (name, other, thing) in enumerate(
        [("ROMEO", "Juliet", "the night"), ("JULIET", "Romeo", "the lark"),
         ("MERCUTIO", "Benvolio", "a plague"), ("NURSE", "lady", "the wedding")] * 40
    )
)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from lora_gpt2.cli import main

    def run(*args: str):
        capsys.readouterr()
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
    from lora_gpt2.prepare import ensure_prepared

    d = tmp_path_factory.mktemp("text")
    (d / "input.txt").write_text(SAMPLE_TEXT)
    ensure_prepared(d)
    return d


def train_config(checkpoint: str, data, out, **overrides):
    """A tiny, fast TrainConfig; keyword overrides go to the right section."""
    from lora_gpt2 import train_config as tc

    flags = dict(model=checkpoint, data=str(data), out=str(out), targets=("qkv_projection",), rank=4,
                 alpha=8.0, dropout=0.0, dtype="float32", block_size=32, batch_size=4, max_steps=12,
                 lr=3e-3, warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=2, device="cpu")
    flags.update(overrides)
    return tc.resolve(tc.flag_values(flags))
