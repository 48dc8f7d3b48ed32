"""A run folder has one owner: signals save, a lock, readers that never write, resume that checks
before it touches anything, and outputs that never land inside a run."""

import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch

from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2.checkpoints.reading import read_adapter
from lora_gpt2.training import train

from helpers import SAMPLE_TEXT, cli_command, subprocess_env, train_config

FAST = ["--targets", "qkv_projection", "--rank", "4", "--block-size", "32", "--batch-size", "2", "--dtype", "float32",
        "--device", "cpu", "--eval-batches", "1", "--dropout", "0"]


def start_training(tiny, data, out, *extra):
    return subprocess.Popen(cli_command("train", "--model", tiny, "--data", data, "--out", out, *FAST, *extra),
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, n=1):
    """Read the child's plain progress lines (--log-interval 1) until it has trained n steps."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"step {n} |"):
            return seen
    raise AssertionError("the run ended before training: " + "".join(seen[-5:]))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGUSR1, 138)])
def test_a_signal_from_a_cluster_saves_the_step_and_exits_with_its_code(tiny_checkpoint, text_data, tmp_path, sig,
                                                                        code):
    out = tmp_path / "run"
    proc = start_training(tiny_checkpoint[0], text_data, out, "--max-steps", "100000", "--eval-interval", "100000",
                          "--log-interval", "1")
    wait_for_steps(proc, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"{sig.name}: saving a checkpoint after this step" in err and "Traceback" not in err
    step = checkpoint.load_state(out / "last")["step"]
    assert step >= 3 and json.loads((out / "last" / "adapter.json").read_text())["step"] == step
    assert "continue with: lora-gpt2 train --out" in err


def test_a_refused_resume_changes_nothing_and_the_run_still_resumes(tiny_checkpoint, text_data, tmp_path, cli):
    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=4, eval_interval=2))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for args, named in ((["--rank", "8"], "rank 8: the run was trained with rank 4"),
                        (["--targets", "attn"], "targets qkv_projection,output_projection"),
                        (["--alpha", "2"], "alpha 2.0: the run was trained with alpha 8.0"),
                        (["--block-size", "16"], "block_size 16: the run was trained with block_size 32"),
                        (["--data", str(tmp_path)], "data ")):
        code, _, err = cli("train", "--out", out, "--resume", *args)
        assert code == 1 and named in err and len(err.strip().splitlines()) == 1, (args, err)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    code, _, err = cli("train", "--out", out, "--resume", "--max-steps", "2")
    assert code == 1 and "nothing left to train: " in err and "is at step 4 and max_steps is 2" in err
    code, _, err = cli("train", "--out", out, "--resume", "--max-steps", "6")
    assert code == 0, err
    assert checkpoint.load_state(out / "last")["step"] == 6


def test_resume_after_the_data_changed_is_refused_naming_the_file_and_both_hashes(tiny_checkpoint, tmp_path, cli):
    """A changed data content is a changed meaning, as a changed path is: best/ would otherwise be
    chosen across two validation sets."""
    import hashlib

    data = tmp_path / "story.txt"
    data.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], data, out, max_steps=2, eval_interval=2))
    old = hashlib.sha256(data.read_bytes()).hexdigest()
    data.write_text(SAMPLE_TEXT.replace("ROMEO", "TYBALT"))
    new = hashlib.sha256(data.read_bytes()).hexdigest()
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = cli("train", "--out", out, "--resume", "--max-steps", "4")
    assert code == 1 and err.strip().splitlines() == [
        f"lora-gpt2: error: cannot resume {out}: {data} changed since the run began (sha256 {old[:16]} then, "
        f"{new[:16]} now); put the data back, or start a new run with another --out"]
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    data.write_text(SAMPLE_TEXT)  # the same content again: the run continues
    assert cli("train", "--out", out, "--resume", "--max-steps", "4")[0] == 0


def test_resume_applies_a_new_learning_rate_and_says_so(tiny_checkpoint, text_data, tmp_path, cli):
    from lora_gpt2.training.optim import lr_factor

    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=4, eval_interval=2, log_interval=1))
    code, _, err = cli("train", "--out", out, "--resume", "--lr", "0.01", "--max-steps", "6", "--log-interval", "1")
    assert code == 0, err
    assert "resuming with changed settings: " in err and "lr 0.003 -> 0.01" in err and "max_steps 4 -> 6" in err
    logged = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert logged[5] == pytest.approx(0.01 * lr_factor(5, 2, 6, 0.1), rel=1e-12)
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01


def test_resume_auto_starts_fresh_then_continues(tiny_checkpoint, text_data, tmp_path, cli):
    out = tmp_path / "run"
    args = ("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", out, *FAST, "--eval-interval", "2")
    code, _, err = cli(*args, "--resume", "auto", "--max-steps", "2")
    assert code == 0, err
    code, _, err = cli(*args, "--resume", "auto", "--max-steps", "4")
    assert code == 0, err
    assert checkpoint.load_state(out / "last")["step"] == 4 and "steps 2->4" in err


def test_a_new_run_does_not_append_to_a_dead_runs_metrics(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 9.0}) + "\n" for s in range(1, 50)))
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=4, eval_interval=4, log_interval=1))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_one_owner_per_run_folder_and_no_stale_lock_after_sigkill(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "run"
    first = start_training(tiny_checkpoint[0], text_data, out, "--max-steps", "100000", "--eval-interval", "5",
                           "--log-interval", "1")
    wait_for_steps(first, 6)
    for extra in ([], ["--resume"]):
        second = subprocess.run(cli_command("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", out,
                                            *FAST, *extra), env=subprocess_env(), capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"lora-gpt2: error: run folder {out} is in use by process {first.pid} (a training run holds its lock); "
            "wait for it to end, or choose another --out"]
    first.kill()
    first.wait()
    step = checkpoint.load_state(out / "last")["step"]
    resumed = subprocess.run(cli_command("train", "--out", out, "--resume", "--max-steps", str(step + 3)),
                             env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_state(out / "last")["step"] == step + 3


@pytest.mark.slow
def test_readers_during_checkpoint_swaps_read_whole_checkpoints_and_write_nothing(tiny_checkpoint, text_data,
                                                                                 tmp_path):
    """A reader loop races a trainer that swaps last/ and best/ every step; every read is consistent,
    and the trainer, whose temporaries a reader used to delete, finishes cleanly."""
    out = tmp_path / "run"
    trainer = start_training(tiny_checkpoint[0], text_data, out, "--max-steps", "120", "--eval-interval", "1",
                             "--save-interval", "1", "--log-interval", "1")
    wait_for_steps(trainer, 2)
    reads, problems = [], []
    while trainer.poll() is None:
        for target in (out, out / "last"):
            try:
                reads.append(read_adapter(target).meta["step"])
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                problems.append(repr(exc))
    err = trainer.stderr.read()
    assert trainer.returncode == 0, err
    assert problems == [] and len(reads) >= 50
    assert reads != sorted(reads) or len(set(reads)) > 10  # the reads did see the checkpoints change


def test_a_reader_leaves_a_folder_mid_swap_exactly_as_it_found_it(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=2, eval_interval=2))
    os.replace(out / "best", out / ".prev-best")  # the moment between a swap's two renames
    (out / ".tmp-999999-last").mkdir()  # a live trainer's temporary
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    adapter = read_adapter(out)
    assert adapter.path == out / ".prev-best" and adapter.meta["step"] == 2
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing


@pytest.fixture
def finished_run(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=2, eval_interval=2))
    return out


@pytest.mark.parametrize("command", ["merge", "export"])
def test_outputs_never_land_inside_a_run_or_over_other_files(finished_run, tmp_path, cli, command):
    run = finished_run
    config = (run / "config.json").read_bytes()
    for target in (run, run / "best", run / "exports"):
        code, _, err = cli(command, run, target)
        assert code == 1 and "is inside the training run or adapter" in err, err
    assert (run / "config.json").read_bytes() == config and not (run / "exports").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, err = cli(command, run, busy)
    assert code == 1 and "holds 'notes.txt', which this command did not write" in err
    (tmp_path / "file").write_text("x")
    code, _, err = cli(command, run, tmp_path / "file")
    assert code == 1 and "is a file, not a folder" in err
    code, _, err = cli(command, run, tmp_path / "out")
    assert code == 0, err
    code, _, err = cli(command, run, tmp_path / "out")  # an earlier output of the same command: rewritten
    assert code == 0, err
    code, _, err = cli(command, run, busy, "--force")
    assert code == 0 and (busy / "notes.txt").read_text() == "mine"
    # another tool's output under the same file names is not an earlier output of ours
    other = tmp_path / "other"
    other.mkdir()
    name = "adapter_config.json" if command == "export" else "config.json"
    (other / name).write_text('{"peft_type": "LORA", "r": 99}')
    code, _, err = cli(command, run, other)
    assert code == 1 and f"holds '{name}', which this command did not write" in err, err
    assert (other / name).read_text() == '{"peft_type": "LORA", "r": 99}' and len(list(other.iterdir())) == 1


def test_export_checks_the_adapter_like_every_reader(finished_run, tmp_path, cli):
    data = bytearray((finished_run / "best" / "adapter.safetensors").read_bytes())
    data[-3] ^= 0x40
    (finished_run / "best" / "adapter.safetensors").write_bytes(bytes(data))
    code, _, err = cli("export", finished_run / "best", tmp_path / "peft")
    assert code == 1 and "does not match the sha256 in adapter.json" in err
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda lora: lora.update(r=2), "adapter.json says r=2, targets qkv_projection, variant lora, but tensor "
                                    "blocks.0.attn.qkv_projection.lora_a is (4, 32) where that needs (2, 32)"),
    (lambda lora: lora.update(targets=["qkv_projection", "lm_head"]),
     "adapter.json says r=4, targets qkv_projection,lm_head, variant lora, but it has no tensor lm_head.lora_a"),
    (lambda lora: lora.update(variant="dora"), "adapter.json says r=4, targets qkv_projection, variant dora, but it "
                                               "has no tensor blocks.0.attn.qkv_projection.magnitude"),
    (lambda lora: lora.update(targets=["output_projection"]), "adapter.json says r=4, targets output_projection, "
                                                              "variant lora, but it has no tensor "
                                                              "blocks.0.attn.output_projection.lora_a"),
])
def test_what_adapter_json_says_must_agree_with_the_tensors(finished_run, tmp_path, cli, edit, message):
    meta_path = finished_run / "best" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["lora"])
    meta_path.write_text(json.dumps(meta))
    for command in (["export", finished_run / "best", tmp_path / "peft"], ["generate", "Hi", "--adapter", finished_run,
                                                                          "--max-new-tokens", "2"]):
        code, _, err = cli(*command)
        assert code == 1 and err.strip().splitlines() == [
            f"lora-gpt2: error: {finished_run / 'best' / 'adapter.safetensors'}: {message}"], (command, err)
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(base_model=123), "base_model must be a string, got 123"),
    (lambda m: m.update(format_version="1"), "format_version must be a positive integer, got '1'"),
    (lambda m: m.update(adapter_sha256=5), "adapter_sha256 must be a string, got 5"),
    (lambda m: m["eval"].update(block_size="32"), "eval.block_size must be an integer, got '32'"),
    (lambda m: m.update(lora=[4]), "lora must be an object with targets and r, got [4]"),
])
def test_wrong_types_in_adapter_json_are_named(finished_run, cli, edit, message):
    meta_path = finished_run / "best" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    code, _, err = cli("eval", "--adapter", finished_run / "best", "--device", "cpu")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_eval_json_writes_null_for_a_loss_that_is_not_finite(finished_run, cli):
    from safetensors.torch import load_file, save_file

    best = finished_run / "best"
    tensors = load_file(best / "adapter.safetensors")
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    save_file(tensors, best / "adapter.safetensors")
    meta = json.loads((best / "adapter.json").read_text())
    meta.pop("adapter_sha256")
    (best / "adapter.json").write_text(json.dumps(meta))
    code, out, err = cli("eval", "--adapter", best, "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)  # strict JSON: NaN would not parse in most readers
    assert report["adapter"] == {"loss": None, "perplexity": None, "reason": "the loss is nan (not finite)"}
    assert isinstance(report["base"]["loss"], float)
    code, _, err = cli("eval", "--adapter", best, "--device", "cpu", "--block-size", "0")
    assert code == 1 and "--block-size must be >= 1, got 0" in err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "--config {} is a folder; give a TOML file"),
])
def test_config_that_is_a_folder(tmp_path, cli, make, message):
    make(tmp_path / "c")
    code, _, err = cli("train", "--config", tmp_path / "c", "--print-config")
    assert code == 1 and message.format(tmp_path / "c") in err


def test_out_that_is_a_file_and_token_ids_beyond_the_vocabulary(tiny_checkpoint, text_data, tmp_path, cli):
    (tmp_path / "taken").write_text("x")
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", tmp_path / "taken", *FAST)
    assert code == 1 and f"--out {tmp_path / 'taken'} is a file, not a folder" in err
    small = tmp_path / "small"
    from helpers import make_hf_model

    make_hf_model(vocab_size=50300).save_pretrained(small)  # a bigger vocabulary works...
    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    ids = bytearray((data / "train.bin").read_bytes())
    ids[0:2] = (60000).to_bytes(2, "little")  # ...but an id past it is named, not an IndexError
    (data / "train.bin").write_bytes(bytes(ids))
    code, _, err = cli("train", "--model", small, "--data", data, "--out", tmp_path / "r", *FAST)
    assert code == 1 and "holds token id 60000, beyond the model's vocabulary of 50300" in err, err


@pytest.mark.slow
def test_a_reader_that_leaves_is_not_an_error(finished_run, tmp_path):
    for command in (["generate", "ROMEO:", "--adapter", str(finished_run), "--max-new-tokens", "400", "--device",
                     "cpu"], ["eval", "--adapter", str(finished_run), "--json", "--device", "cpu"]):
        line = " ".join(map(lambda a: f"'{a}'", cli_command(*command)))
        done = subprocess.run(["bash", "-c", f"set -o pipefail; {line} | head -c 1 >/dev/null"],
                              env=subprocess_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "error" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/no-model"], "{tmp}/no-model"),
    (["--data", "{tmp}/no-data.txt"], "data '{tmp}/no-data.txt' not found"),
    (["--data", "{tmp}/binary.txt"], "binary.txt looks binary (it holds NUL bytes, the first at offset 0), not UTF-8 text"),
    (["--rank", "100000000"], "rank r=100000000 is more than qkv_projection can use: its weight is 96 x 32, so its "
                              "full rank is 32; choose a rank of at most 32"),
    (["--block-size", "1000"], "block_size 1000 is longer than the model's context of 64"),
    (["--resume"], "nothing to resume in {tmp}/run"),
    (["--max-steps", "1", "--targets", "attn", "--eval-batches", "1000000"], None),  # accepted: the control
])
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "folder-with-a-file"])
def test_a_refused_train_leaves_the_out_folder_as_it_was(tiny_checkpoint, text_data, tmp_path, cli, args, message,
                                                         existing):
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    out = tmp_path / "run"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", out, *FAST, *args)
    if message is None:
        assert code == 0 and (out / "config.json").is_file(), err
        return
    assert code == 1
    [line] = err.strip().splitlines()[-1:]
    assert line.startswith("lora-gpt2: error: ") and message.format(tmp=tmp_path) in line, err
    if existing:  # someone else's folder stays, with at most the (released) lock added
        assert {p.name for p in out.iterdir()} - {".lock"} == {"notes.txt"}
        assert (out / "notes.txt").read_text() == "mine"
    else:  # a folder made for the run goes with it
        assert not out.exists()


def test_a_diverging_run_with_no_checkpoint_yet_does_not_name_one(tiny_checkpoint, text_data, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", out, *FAST,
                       "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "20", "--eval-interval", "100")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"lora-gpt2: error: loss became (nan|inf) at step \d+ \(--lr 1e\+30\); "
                        r"stopped without saving. No checkpoint was saved yet: start again with a lower --lr", line), line
    assert not (out / "last").exists()
