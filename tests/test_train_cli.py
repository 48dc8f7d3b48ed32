"""`lora-gpt2 train` from the command line and its settings: each declared once, config
precedence, one validator, bad values, Ctrl-C, DDP."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2.training import config as tc
from lora_gpt2.adapters import lora
from lora_gpt2.config import LoRAConfig, ModelConfig
from lora_gpt2.model.gpt2 import GPT2

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


def test_a_second_ctrl_c_stops_at_once_and_says_it_did_not_save(tiny_checkpoint, text_data, tmp_path):
    # Python runs a signal handler between two C calls, and two SIGINTs landing in one backward
    # count as one. So a step here is 8 micro-batches (a signal is seen after one backward at the
    # latest), the first Ctrl-C goes just after a step's line, and the second only once the first is
    # acknowledged, with most of the step left to run.
    out = tmp_path / "run"
    args = ["--model", tiny_checkpoint[0], "--data", text_data, "--out", out, *TINY, "--batch-size", "2",
            "--grad-accum", "8", "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1",
            "--save-interval", "2"]
    proc = run_train(*args)
    lines: queue.Queue = queue.Queue()
    err: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            err.append(line)
            lines.put(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_for(pattern: str) -> str:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                line = lines.get(timeout=deadline - time.time())
            except queue.Empty:
                break
            if re.match(pattern, line):
                return line
        proc.kill()
        raise AssertionError(f"no line matching {pattern!r} in {''.join(err)}")

    wait_for(r"step 3 \|")  # step 2 is saved (--save-interval) and step 4 has begun
    proc.send_signal(signal.SIGINT)
    wait_for(r"SIGINT: saving a checkpoint after this step \(Ctrl-C again to stop at once\)")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, "".join(err)
    reader.join(timeout=10)
    text = "".join(err)
    assert text.strip().splitlines()[-1] == (
        "lora-gpt2: error: stopped at once by a second Ctrl-C, without saving this step; the last "
        "checkpoint is intact (continue with --resume)"), text
    assert "Traceback" not in text and "step 4 |" not in text
    assert json.loads((out / "last" / "adapter.json").read_text())["step"] == 2  # only --save-interval's
    assert torch.load(out / "last" / "state.pt", weights_only=True)["step"] == 2


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


# a value other than the default for each kind of setting, valid for every setting of that kind
OTHER = {"model": "gpt2-medium", "targets": "attn,lm_head", "dtype": "bfloat16", "variant": "dora", "init": "olora",
         "layers": "2", "data": "elsewhere", "text_column": "body", "prompt_column": "q", "completion_column": "a",
         "optimizer": "adam", "out": "out/other", "device": "cpu", "log": "wandb", "alpha": 4.0, "dropout": 0.25,
         "lr": 0.002, "weight_decay": 0.125, "beta1": 0.5, "beta2": 0.75, "min_lr_ratio": 0.5, "grad_clip": 2.0,
         "lora_plus_ratio": 4.0, "epochs": 1.5, "save_interval_minutes": 2.5, "chat_template": "chatml.jinja",
         "train_on": "all"}


def test_every_declared_setting_is_a_flag_a_toml_key_and_a_resume_rule(tmp_path, cli, monkeypatch):
    """Settings are declared once (training/config.py): each is a flag with its help, a TOML key
    that --print-config writes back, and fixed on resume exactly when declared so."""
    monkeypatch.setenv("COLUMNS", "250")  # room for every flag's name in the help table
    code, help_text, _ = cli("train", "--help")
    assert code == 0
    for name, declared in tc.SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        assert flag in help_text and declared.metadata["help"].split(":")[0].split(" (")[0][:30] in help_text, flag
        default = getattr(getattr(tc.TrainConfig(), tc.FIELD_SECTION[name]), name)
        if isinstance(default, bool) or (default is None and name == "mask_prompt"):
            value, args = not default, [flag if not default else f"--no-{flag[2:]}"]
        elif name in OTHER:
            value = OTHER[name]
            args = [flag, str(value)]
        else:  # an integer
            value = (default or 0) + 3
            args = [flag, str(value)]
        code, out, err = cli("train", *args, "--print-config")
        assert code == 0, (name, err)
        written = tc.read_toml_text(out)[tc.FIELD_SECTION[name]][name]
        expected = tc.resolve(tc.flag_values({name: value}))
        assert written == getattr(getattr(expected, tc.FIELD_SECTION[name]), name), name
        assert written != default, name
    fixed = {name for section, name in tc.FIXED_ON_RESUME}
    assert fixed == {"model", "targets", "rank", "alpha", "rslora", "layers", "variant", "init", "data", "block_size",
                     "text_column", "prompt_column", "completion_column", "mask_prompt", "chat_template", "train_on",
                     "optimizer", "lora_plus_ratio"}


def test_resume_is_one_setting_read_one_way(tiny_checkpoint, text_data, tmp_path, cli):
    assert [tc.resume_mode(v) for v in (None, False, True, "no", "yes", "auto", tc.Resume.auto)] == \
        ["no", "no", "yes", "no", "yes", "auto", "auto"]
    with pytest.raises(ValueError, match="resume must be one of no, yes, auto; got 'maybe'"):
        tc.resume_mode("maybe")
    args = ["train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", tmp_path / "r", *TINY,
            "--max-steps", "2", "--eval-interval", "2"]
    assert cli(*args, "--resume", "auto")[0] == 0  # nothing there: a new run
    code, _, err = cli(*args[:-2], "--resume", "--max-steps", "3")  # --resume alone, before another flag
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "last" / "adapter.json").read_text())["step"] == 3
    code, _, err = cli(*args, "--resume", "maybe")
    assert code == 1 and err.strip().splitlines() == [
        "lora-gpt2: error: Invalid value for '--resume': Value error, 'maybe' is not one of 'no', 'yes', 'auto'. "
        "(got 'maybe')"]


@pytest.mark.parametrize("cli_key, lib_key, value, message", [
    ("rank", "r", 0, "rank r must be >= 1, got 0"),
    ("alpha", "alpha", -1.0, "alpha must be > 0, got -1.0"),
    ("dropout", "dropout", 1.5, r"dropout must be in \[0, 1\), got 1.5"),
])
def test_one_validator_for_lora_settings_in_the_library_and_the_cli(cli_key, lib_key, value, message):
    from lora_gpt2.training import config as tc

    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{lib_key: value})
    with pytest.raises(ValueError, match=message):
        tc.resolve(tc.flag_values({cli_key: value}))
    with pytest.raises(ValueError, match=message):
        lora.Linear(4, 4, True, **{"r": 2, lib_key: value})


def test_config_coercion_and_precedence():
    from lora_gpt2.training import config as tc

    assert tc.flag_values({"targets": "attn, lm_head", "rank": 4})["model"] == {
        "targets": ("attn", "lm_head"), "rank": 4}
    assert tc.flag_values({"lr": 1})["optim"]["lr"] == 1.0 and isinstance(tc.flag_values({"lr": 1})["optim"]["lr"], float)
    with pytest.raises(ValueError, match="rank must be an integer, got True"):
        tc.flag_values({"rank": True})
    with pytest.raises(ValueError, match="model.targets must be a list of names, got 3"):
        tc.read_toml_text("[model]\ntargets = 3\n")
    file_layer = tc.read_toml_text("[optim]\nlr = 0.01\nepochs = 2\n[model]\nrank = 16\n")
    resolved = tc.resolve(file_layer, tc.flag_values({"rank": 2, "max_steps": 7}))
    assert (resolved.model.rank, resolved.optim.lr) == (2, 0.01)  # flag > file
    assert (resolved.optim.max_steps, resolved.optim.epochs) == (7, None)  # a later layer's choice clears the other
    assert resolved.data == tc.DataSettings()  # defaults fill the rest


def test_labml_toml_is_the_reference_experiment_by_its_parameter_count():
    """Rank 32 on all seven targets of GPT-2 small: the reference's trainable-parameter count, by hand."""
    from lora_gpt2.training import config as tc

    cfg = tc.resolve(tc.read_toml(ROOT / "configs" / "labml.toml"))
    with torch.device("meta"):
        model = GPT2(ModelConfig(), cfg.model.lora)
    r, d, v, ctx = 32, 768, 50257, 1024
    per_block = r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    expected = 12 * per_block + r * (v + d) + r * (ctx + d) + r * (d + v)
    assert lora.count_parameters(model)[0] == expected == 8_041_536
    assert cfg.model.lora.scaling == 1.0 and cfg.optim.optimizer == "adam" and cfg.optim.lr == 1e-4
    assert (cfg.data.batch_size, cfg.data.block_size, cfg.optim.epochs) == (32, 512, 10.0)


def test_train_help_shows_the_effective_defaults(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one help line per option
    code, out, _ = cli("train", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    for shown in ("(default: 8)", "(default: 16.0)", "(default: 0.0005)", "(default: gpt2)",
                  "(default: qkv_projection,output_projection,linear_in,linear_out)"):
        assert shown.replace(" ", "") in text.replace(" ", ""), shown
