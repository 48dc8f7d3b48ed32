"""`lora-gpt2 train` from the command line: config precedence, bad values, Ctrl-C, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2.training import config as tc

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--targets", "qkv_projection", "--rank", "4", "--block-size", "32", "--batch-size", "4",
        "--dtype", "float32", "--device", "cpu", "--eval-batches", "2", "--dropout", "0"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_shakespeare_toml_equals_the_built_in_defaults():
    assert tc.resolve(tc.read_toml(ROOT / "configs" / "shakespeare.toml")) == tc.TrainConfig()


def test_precedence_flag_over_file_over_defaults(tmp_path, cli):
    config = tmp_path / "c.toml"
    config.write_text('[model]\nrank = 16\n[optim]\nlr = 0.002\nepochs = 2\n[run]\nseed = 7\n')
    code, out, err = cli("train", "--config", config, "--rank", "4", "--print-config")
    assert code == 0, err
    printed = tc.resolve(tc.read_toml_text(out))
    assert printed.model.rank == 4                      # flag beats file
    assert printed.optim.lr == 0.002 and printed.run.seed == 7  # file beats defaults
    assert printed.optim.epochs == 2.0 and printed.optim.max_steps is None
    assert printed.data.block_size == tc.DataSettings().block_size  # defaults fill the rest
    code, out, _ = cli("train", "--config", config, "--max-steps", "50", "--print-config")
    assert "max_steps = 50" in out and "epochs" not in out


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "rank r must be >= 1, got 0"),  # the library's own check and words
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--lr", "-1e-3"], "lr must be > 0, got -0.001"),
    (["--lr", "nan"], "lr must be > 0, got nan"),
    (["--batch-size", "0"], "batch_size must be > 0, got 0"),
    (["--rank", "abc"], "Invalid value for '--rank'"),
    (["--targets", "c_attn"], "unknown LoRA target 'c_attn'"),
    (["--dtype", "float8"], "dtype must be one of auto, float32, bfloat16, float16; got 'float8'"),
    (["--max-steps", "5", "--epochs", "1"], "give exactly one of max_steps and epochs"),
    (["--config", "missing.toml"], "config file 'missing.toml' not found"),
])
def test_bad_values_are_one_line_errors(args, message, cli):
    code, out, err = cli("train", *args, "--print-config")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("lora-gpt2: error: ")
    assert message in err


@pytest.mark.parametrize("toml, message", [
    ("[model]\nrnk = 4\n", "unknown key 'model.rnk' in"),
    ("[optim]\nlr = 'fast'\n", "optim.lr must be a number, got 'fast'"),
    ("[model]\nrank = 4.5\n", "model.rank must be an integer, got 4.5"),
    ("[training]\nlr = 1\n", "unknown section [training]"),
    ("[model\n", "is not valid TOML"),
])
def test_bad_toml_files_name_the_key(tmp_path, cli, toml, message):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    code, _, err = cli("train", "--config", config, "--print-config")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_block_size_beyond_context_from_the_cli(tiny_checkpoint, text_data, tmp_path, cli):
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", tmp_path / "r",
                       *TINY, "--block-size", "65")
    assert code == 1
    assert err.strip().splitlines()[-1] == ("lora-gpt2: error: block_size 65 is longer than the model's "
                                            "context of 64")


def run_train(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "lora_gpt2", "train", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_ctrl_c_saves_a_resumable_checkpoint(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "run"
    args = ["--model", tiny_checkpoint[0], "--data", text_data, "--out", out, *TINY,
            "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1"]
    proc = run_train(*args)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with: lora-gpt2 train --out" in err and "Traceback" not in err
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    step = state["step"]
    assert step >= 1 and json.loads((out / "last" / "adapter.json").read_text())["step"] == step
    resumed = run_train("--out", out, "--resume", "--max-steps", str(step + 3))
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert json.loads((out / "last" / "adapter.json").read_text())["step"] == step + 3


def test_ddp_two_gloo_processes_equal_one_process_over_the_same_global_batches(tiny_checkpoint, text_data, tmp_path):
    """Also: --grad-checkpoint under DDP changes nothing, and only rank 0 logs to TensorBoard."""
    common = ["--model", tiny_checkpoint[0], "--data", text_data, *TINY, "--max-steps", "4",
              "--eval-interval", "4", "--grad-accum", "2", "--targets", "attn"]
    single = run_train(*common, "--out", tmp_path / "single", "--batch-size", "4")
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lora_gpt2", "train", *map(str, common), "--out", str(tmp_path / "ddp"), "--batch-size", "2",
         "--grad-checkpoint", "--logger", "tensorboard"],  # torchrun's own parser would take --log
        env=env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(tmp_path / "single" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "ddp" / "last" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    assert "device cpu x2" in ddp.stderr and ddp.stderr.count("done: step 4/4") == 1
    events = list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # rank 1 wrote nothing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("train/loss")] == \
        [(r["step"], r["train_loss"]) for r in rows]
