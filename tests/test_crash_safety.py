"""Crash safety: SIGKILL at random moments, full disks, and files that are not what they claim."""

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2 import checkpoint
from lora_gpt2.adapters import load_with_adapter
from lora_gpt2.errors import WriteError
from lora_gpt2.training import train

from helpers import train_config

ROOT = Path(__file__).resolve().parents[1]
KILL_TRIALS = 20
STEPS = 150


def train_cmd(tiny, data, out, *extra):
    return [sys.executable, "-m", "lora_gpt2", "train", "--model", tiny, "--data", str(data), "--out", str(out),
            "--targets", "attn", "--rank", "4", "--block-size", "32", "--batch-size", "4", "--dtype", "float32",
            "--device", "cpu", "--eval-batches", "1", "--dropout", "0.1", "--max-steps", str(STEPS),
            "--eval-interval", "5", "--save-interval", "1", "--log-interval", "1", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def metrics_size(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.stat().st_size if path.exists() else -1


def assert_loadable(out: Path, tiny: str) -> int:
    """The latest checkpoint loads: adapter (checked against its sha256) and state."""
    checkpoint.recover_checkpoint(out / "last")
    model, _ = load_with_adapter(str(out / "last"), model=tiny)
    state = checkpoint.load_state(out / "last")
    assert state["step"] == json.loads((out / "last" / "adapter.json").read_text())["step"]
    return state["step"]


def test_sigkill_at_random_moments_never_loses_the_run(tiny_checkpoint, text_data, tmp_path):
    tiny = tiny_checkpoint[0]
    rng = random.Random(1234)
    reference = tmp_path / "reference"
    done = subprocess.run(train_cmd(tiny, text_data, reference), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    steps_seen, torn_writes = [], 0
    for trial in range(KILL_TRIALS):
        resume = ["--resume"] if (out / "last").exists() or (out / ".prev-last").exists() else []
        proc = subprocess.Popen(train_cmd(tiny, text_data, out, *resume), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        logged = metrics_size(out)
        deadline = time.time() + 60
        while time.time() < deadline and metrics_size(out) <= logged and proc.poll() is None:
            time.sleep(0.01)  # wait until this process trains (it logs every step)
        if trial % 2:  # odd trials: kill at the first sight of a checkpoint being written
            while proc.poll() is None and not any(n.startswith(".tmp-") for n in os.listdir(out)):
                pass
        else:  # even trials: a random moment, in a step, an evaluation or a write
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == 0:  # it finished before the kill: nothing left to interrupt
            break
        torn_writes += any(p.name.startswith((".tmp-", ".prev-")) for p in out.iterdir())
        steps_seen.append(assert_loadable(out, tiny))
    finish = subprocess.run(train_cmd(tiny, text_data, out, "--resume"), env=env(), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert assert_loadable(out, tiny) == STEPS
    assert len(set(steps_seen)) >= KILL_TRIALS // 2, steps_seen  # the kills landed all along the run
    assert torn_writes >= 1  # and some inside a checkpoint write, which recovery then cleaned up
    print(f"kills at steps {steps_seen}, {torn_writes} inside checkpoint writes")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".prev-"))]
    assert leftovers == []
    # every restart resumed exactly: the end state equals the run that was never killed
    a = load_file(reference / "last" / "adapter.safetensors")
    b = load_file(out / "last" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_stops_with_the_path_and_keeps_the_previous_checkpoint(tiny_checkpoint, text_data, tmp_path,
                                                                         monkeypatch):
    import lora_gpt2.checkpoint as ckpt

    out = tmp_path / "run"
    cfg = train_config(tiny_checkpoint[0], text_data, out, max_steps=8, eval_interval=100, save_interval=2)
    calls = {"n": 0}
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # the third checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"cannot write .*run/\.tmp-\d+-last/state.pt: No space left on device"):
        train(cfg)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert assert_loadable(out, tiny_checkpoint[0]) == 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")] == []


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_in_state_pt_is_refused_not_run(tiny_checkpoint, text_data, tmp_path, cli):
    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=2, eval_interval=2))
    marker = tmp_path / "pwned"
    (out / "last" / "state.pt").write_bytes(pickle.dumps({"step": _Exploit(str(marker))}))
    code, _, err = cli("train", "--out", out, "--resume", "--max-steps", "4")
    assert code == 1 and not marker.exists()
    assert err.strip().splitlines()[-1].startswith(f"lora-gpt2: error: {out / 'last' / 'state.pt'} cannot be loaded safely")


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "last" / "state.pt").write_bytes((out / "last" / "state.pt").read_bytes()[:200]),
     "state.pt cannot be loaded safely"),
    (lambda out: (out / "last" / "adapter.safetensors").write_bytes(b"\x00" * 64),
     "adapter.safetensors does not match the sha256 in adapter.json"),
    (lambda out: (out / "last" / "adapter.json").write_text(
        (out / "last" / "adapter.json").read_text().replace('"format_version": 1', '"format_version": 2')),
     "has format version 2, newer than this lora-gpt2"),
])
def test_damaged_run_files_are_one_line_errors_on_resume(tiny_checkpoint, text_data, tmp_path, cli, damage, message):
    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=2, eval_interval=2))
    damage(out)
    code, _, err = cli("train", "--out", out, "--resume", "--max-steps", "4")
    assert code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_damaged_token_files_are_named(text_data, tmp_path, cli, tiny_checkpoint):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-6])
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", data, "--out", tmp_path / "o",
                       "--block-size", "32", "--device", "cpu")
    assert code == 1 and "train.bin holds" in err and "meta.json says" in err


def test_adapter_on_another_base_is_refused_from_the_cli(tiny_checkpoint, text_data, tmp_path, cli):
    from helpers import make_hf_model

    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=2, eval_interval=2))
    other = tmp_path / "other"
    make_hf_model(seed=11).save_pretrained(other)
    code, _, err = cli("generate", "x", "--adapter", out, "--model", other, "--device", "cpu")
    assert code == 1 and "was trained on base" in err and "pass --force" in err
    code, _, _ = cli("generate", "x", "--adapter", out, "--model", other, "--device", "cpu", "--force",
                     "--max-new-tokens", "2")
    assert code == 0
