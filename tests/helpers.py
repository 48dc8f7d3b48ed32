"""Helpers the tests share: tiny random GPT-2 checkpoints in the real Hugging Face format,
sample text, and a fast TrainConfig. Tests import this module; conftest.py holds fixtures only."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
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


def randomize_adapters(model, seed: int, scale: float):
    """Random adapter tensors in place (a fresh adapter equals the base model, which hides mistakes)."""
    from lora_gpt2.adapters.lora import lora_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_adapter(checkpoint_dir, out, targets, *, seed=1, scale=0.05, **lora):
    """An adapter folder with random (non-zero) A and B on `targets`, and its model."""
    from lora_gpt2 import load_pretrained
    from lora_gpt2.checkpoints import adapter_dir
    from lora_gpt2.config import LoRAConfig

    model = load_pretrained(checkpoint_dir, lora=LoRAConfig(targets=targets, r=4, alpha=8.0, **lora))
    randomize_adapters(model, seed, scale)
    adapter_dir.save_checkpoint(out, model, None, step=0)
    return out, model


def save_hf_model(model, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


SAMPLE_TEXT = "".join(
    f"{name}:\nWhat say you, {other}? The {n}th hour comes, and with it {thing}.\n\n"
    for n, (name, other, thing) in enumerate(
        [("ROMEO", "Juliet", "the night"), ("JULIET", "Romeo", "the lark"),
         ("MERCUTIO", "Benvolio", "a plague"), ("NURSE", "lady", "the wedding")] * 40
    )
)


def train_config(checkpoint: str, data, out, **overrides):
    """A tiny, fast TrainConfig; keyword overrides go to the right section."""
    from lora_gpt2.training import config as tc

    flags = dict(model=checkpoint, data=str(data), out=str(out), targets=("qkv_projection",), rank=4,
                 alpha=8.0, dropout=0.0, dtype="float32", block_size=32, batch_size=4, max_steps=12,
                 lr=3e-3, warmup_steps=2, eval_interval=4, eval_batches=2, log_interval=2, device="cpu")
    flags.update(overrides)
    return tc.resolve(tc.flag_values(flags))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI child process: this checkout first on the path, one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "lora_gpt2", *map(str, args)]


@contextlib.contextmanager
def built_trainer(config, resume: str = "no"):
    """A Trainer over a built run, with the run's own subscribers; the run's lock is released after."""
    from lora_gpt2.training import distributed
    from lora_gpt2.training import Trainer, factory
    from lora_gpt2.training.loop import default_subscribers

    run = factory.build(config, distributed.setup("cpu"), resume)
    try:
        trainer = Trainer(run)
        trainer.subscribers = default_subscribers(config, run.model, trainer.emit)
        yield trainer
    finally:
        run.lock.release()


_READ_ONLY = ('n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind "$1" "$1" && '
              'mount -o remount,bind,ro "$1" || exit 97; shift; n=$((n - 1)); done; exec "$@"')


def read_only(folders, argv: list[str]) -> list[str]:
    """`argv` run with `folders` read-only. Root ignores permission bits, so for root each folder
    becomes a read-only bind mount in a private mount namespace (a read-only share, as a user
    meets it); otherwise the folders lose their write bits."""
    import shutil
    import subprocess

    import pytest

    folders = [Path(f) for f in folders]
    if os.geteuid() != 0:
        for folder in folders:
            folder.chmod(0o555)
        return argv
    probe = ["unshare", "-m", "sh", "-c", _READ_ONLY, "sh", "1", str(folders[0]), "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a folder read-only")
    return ["unshare", "-m", "sh", "-c", _READ_ONLY, "sh", str(len(folders)), *map(str, folders), *argv]


def ids(n=24, seed=3):
    """Two rows of n random GPT-2 token ids, seeded."""
    import torch

    return torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(seed))


def five_steps_agree(ours, theirs, opt_ours, opt_theirs):
    """Five AdamW steps of lora-gpt2 and of transformers + PEFT on the same batches: every loss
    within 1e-4 (theirs returns an output with .logits)."""
    import torch.nn.functional as F

    for step in range(5):
        x, y = ids(32, seed=100 + step), ids(32, seed=200 + step)
        losses = []
        for model, opt, logits_of in ((ours, opt_ours, lambda m: m(x)), (theirs, opt_theirs, lambda m: m(x).logits)):
            loss = F.cross_entropy(logits_of(model).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4, (step, losses)
