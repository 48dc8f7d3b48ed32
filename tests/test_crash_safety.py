"""Crash safety: SIGKILL at random moments, full disks, and files that are not what they claim."""

import errno
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2.checkpoints.reading import load_with_adapter
from lora_gpt2.errors import WriteError
from lora_gpt2.training import train

from helpers import cli_command, subprocess_env, train_config

KILL_TRIALS = 20
STEPS = 150
# The child runs the real CLI with three pause points added, and says on stderr when it is
# paused there; the test kills it then. So each kill lands where it was aimed, on any machine:
#   step: after optimiser step K, before its checkpoint   tmp: inside the write of step K's files
#   swap: between moving last/ aside and moving the new one in (the riskiest moment)
CHILD = """
import os, sys, time
from pathlib import Path
from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2.cli import main, train_cmd
phase, at = os.environ["KILL_PHASE"], int(os.environ["KILL_AT"])
saving = {}

def pause(where):
    sys.stderr.write(f"PAUSED {where} {at}\\n"); sys.stderr.flush(); time.sleep(300)

real_stepped = train_cmd.TrainView.on_stepped
def on_stepped(self, e):
    real_stepped(self, e)
    if phase == "step" and e.step == at: pause("step")
train_cmd.TrainView.on_stepped = on_stepped

real_save = checkpoint.save_checkpoint
def save_checkpoint(directory, model, state=None, **extra):
    saving.update(name=Path(directory).name, step=extra.get("step"))
    return real_save(directory, model, state, **extra)
checkpoint.save_checkpoint = save_checkpoint

real_write = checkpoint.write_adapter_files
def write_adapter_files(*args, **kwargs):
    real_write(*args, **kwargs)
    if phase == "tmp" and saving == {"name": "last", "step": at}: pause("tmp")
checkpoint.write_adapter_files = write_adapter_files

real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if phase == "swap" and Path(dst).name == ".prev-last" and saving == {"name": "last", "step": at}: pause("swap")
os.replace = replace
main(sys.argv[1:])
"""


def train_args(tiny, data, out, *extra):
    return ["train", "--model", tiny, "--data", str(data), "--out", str(out), "--targets", "attn", "--rank", "4",
            "--block-size", "32", "--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--eval-batches", "1",
            "--dropout", "0.1", "--max-steps", str(STEPS), "--eval-interval", "5", "--save-interval", "1",
            "--log-interval", "1", *extra]


def assert_loadable(out: Path, tiny: str) -> int:
    """The latest checkpoint loads (adapter checked against its sha256, and state), as --resume finds it."""
    from lora_gpt2.training import run_dir

    run_dir.recover(out)  # what the next owner of the folder does first
    model, _ = load_with_adapter(str(out / "last"), model=tiny)
    state = checkpoint.load_state(out / "last")
    assert state["step"] == json.loads((out / "last" / "adapter.json").read_text())["step"]
    return state["step"]


@pytest.mark.slow
def test_sigkill_at_aimed_moments_never_loses_the_run(tiny_checkpoint, text_data, tmp_path):
    tiny = tiny_checkpoint[0]
    rng = random.Random(1234)
    reference = tmp_path / "reference"
    done = subprocess.run(cli_command(*train_args(tiny, text_data, reference)), env=subprocess_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    phases = ("step", "tmp", "swap")
    trained, torn = 0, {"tmp": 0, "swap": 0}
    for trial in range(KILL_TRIALS):
        phase, at = phases[trial % 3], trained + rng.randint(1, 6)
        resume = ["--resume"] if trial else []
        child = subprocess.Popen([sys.executable, "-c", CHILD, *train_args(tiny, text_data, out, *resume)],
                                 env=subprocess_env(KILL_PHASE=phase, KILL_AT=str(at)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in child.stderr:  # blocking reads: no spinning, no timing assumptions
            lines.append(line)
            if line.startswith("PAUSED"):
                break
        child.kill()
        child.wait()
        assert lines and lines[-1] == f"PAUSED {phase} {at}\n", "".join(lines[-5:])
        if phase != "step":
            torn[phase] += any(p.name.startswith((".tmp-", ".prev-")) for p in out.iterdir())
        trained = assert_loadable(out, tiny)
        assert trained == at - 1, (phase, at, trained)  # step `at` was never saved; `at - 1` survives whole
    assert torn["tmp"] >= 1 and torn["swap"] >= 1  # kills really landed inside writes and swaps
    finish = subprocess.run(cli_command(*train_args(tiny, text_data, out, "--resume")), env=subprocess_env(),
                            capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert assert_loadable(out, tiny) == STEPS
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".prev-"))]
    assert leftovers == []
    # every restart resumed exactly: the end state equals the run that was never killed
    a = load_file(reference / "last" / "adapter.safetensors")
    b = load_file(out / "last" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (reference / "metrics.jsonl").read_text().count("\n") == (out / "metrics.jsonl").read_text().count("\n")


def test_disk_full_stops_with_the_path_and_keeps_the_previous_checkpoint(tiny_checkpoint, text_data, tmp_path,
                                                                         monkeypatch):
    import lora_gpt2.checkpoints.adapter_dir as ckpt

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
    with pytest.raises(WriteError, match=f"^cannot write checkpoint {out / 'last'}: No space left on device; the "
                                         "previous one is intact$"):
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
