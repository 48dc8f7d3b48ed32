"""Fitting bigger runs: activation checkpointing, freed memory given back, and the dtype `auto`
picks."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2.training import train

from helpers import built_trainer, train_config


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("targets", [("attn", "ffn"), ("qkv_projection", "token_embedding", "lm_head")])
def test_grad_checkpoint_changes_no_result_dropout_included(tiny_checkpoint, text_data, tmp_path, targets):
    kwargs = dict(targets=targets, max_steps=5, eval_interval=5, dropout=0.2, log_interval=1)
    plain = train(train_config(tiny_checkpoint[0], text_data, tmp_path / "plain", **kwargs))
    ckpt = train(train_config(tiny_checkpoint[0], text_data, tmp_path / "ckpt", grad_checkpoint=True, **kwargs))
    a = load_file(tmp_path / "plain" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "ckpt" / "last" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert plain.last_val_loss == pytest.approx(ckpt.last_val_loss, abs=1e-6)
    losses = [[r["train_loss"] for r in records(tmp_path / name)] for name in ("plain", "ckpt")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_grad_checkpoint_recomputes_instead_of_keeping(tiny_checkpoint, text_data, tmp_path):
    """Saved activations (what autograd keeps for backward) shrink to about the block inputs."""
    cfg = train_config(tiny_checkpoint[0], text_data, tmp_path / "probe", targets=("attn", "ffn"),
                       block_size=64, batch_size=4, dropout=0.1)
    with built_trainer(cfg) as trainer:
        model, batch = trainer.model, trainer.run_.batches.get(0, 0)
        model.train()

        def kept(flag):
            model.grad_checkpoint = flag
            sizes = []

            def pack(t):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(batch.x, targets=batch.y)
            return sum(sizes)

        plain, ckpt = kept(False), kept(True)
    block_input = batch.x.numel() * model.config.n_embd * 4
    assert ckpt < plain / 3
    assert ckpt < (model.config.n_layer + 4) * block_input


def test_grad_checkpoint_is_a_flag_and_a_toml_key(tiny_checkpoint, text_data, tmp_path, cli):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\ngrad_checkpoint = true\nlog = ["tensorboard"]\n')
    code, stdout, _ = cli("train", "--config", str(cfg), "--print-config")
    assert code == 0 and "grad_checkpoint = true" in stdout and 'log = ["tensorboard"]' in stdout
    code, _, stderr = cli("train", "--config", str(cfg), "--log", "comet", "--print-config")
    assert code == 1 and stderr.strip() == "lora-gpt2: error: log must be one of tensorboard, wandb; got 'comet'"


@pytest.mark.parametrize("amx, avx512_bf16, expected, why", [
    (False, False, torch.float32, "auto: this CPU has no native bfloat16 (AVX512-BF16 or AMX): it would be emulated"),
    (False, True, torch.bfloat16, "auto: this CPU has native bfloat16 (AVX512-BF16)"),
    (True, True, torch.bfloat16, "auto: this CPU has native bfloat16 (AMX, AVX512-BF16)"),
])
def test_auto_dtype_is_bfloat16_on_cpus_with_native_bfloat16(monkeypatch, amx, avx512_bf16, expected, why):
    from lora_gpt2.devices import dtype_choice, resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert dtype_choice("auto", torch.device("cpu")) == (expected, why)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert dtype_choice("float32", torch.device("cpu")) == (torch.float32, "asked for")


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_is_said_first_and_recorded(tiny_checkpoint, text_data, tmp_path, cli, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    out = tmp_path / "run"
    code, _, stderr = cli("train", "--model", tiny_checkpoint[0], "--data", str(text_data), "--out", str(out),
                          "--rank", "4", "--block-size", "32", "--batch-size", "2", "--max-steps", "2",
                          "--eval-interval", "2", "--eval-batches", "1", "--device", "cpu", "--dtype", "auto")
    assert code == 0
    name = "bfloat16" if native else "float32"
    why = ("this CPU has native bfloat16 (AVX512-BF16)" if native
           else "this CPU has no native bfloat16 (AVX512-BF16 or AMX): it would be emulated")
    second = stderr.splitlines()[1]
    assert second.startswith(f"device cpu x1, dtype {name} (auto: {why}), ")
    meta = json.loads((out / "last" / "adapter.json").read_text())
    assert (meta["dtype"], meta["dtype_choice"]) == (name, f"auto: {why}")


ALLOCATOR_PROBE = """
import sys, torch
def rss(): return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
if sys.argv[1] == "fixed":
    from lora_gpt2.allocator import return_large_frees
    assert return_large_frees()
x = torch.ones(2**20); del x  # a 4 MB block freed: glibc raises its mmap threshold past it
big, small = [], []
for _ in range(60):
    big.append(torch.ones(2**20 - 1024))  # just under 4 MB each
    small.append(torch.ones(4096))  # long-lived 16 KB blocks between them
before = rss()
big.clear()
print(round(before - rss()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_gives_freed_activation_memory_back(tmp_path):
    """Freed blocks of a few MB go back to the system instead of staying on a fragmented heap:
    what keeps --grad-checkpoint's peak at 1.6 GB rather than 3.1 GB at batch 8 x 1024."""
    import subprocess

    from helpers import subprocess_env

    env = subprocess_env()
    env.pop("MALLOC_MMAP_THRESHOLD_", None)

    def returned(mode):
        done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert returned("default") < 60  # of 240 MB freed, glibc keeps most on its heap
    assert returned("fixed") > 200
