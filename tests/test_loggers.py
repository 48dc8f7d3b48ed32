"""What a run reports: typed events in order to its subscribers, metrics.jsonl (torn lines
skipped), loss.png; and `--log tensorboard` and `--log wandb`: read back with each tool's own
reader, equal to metrics.jsonl; a logger that fails never stops training."""

import json
import time
from pathlib import Path

import pytest

from lora_gpt2.training import train

from helpers import train_config

SCALARS = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss", "val_ppl": "val/perplexity"}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def expected_scalars(rows):
    wanted: dict[str, list] = {}
    for row in rows:
        for key, tag in SCALARS.items():
            if key in row:
                wanted.setdefault(tag, []).append((row["step"], row[key]))
    return wanted


def assert_same_series(got, wanted, rel=1e-6):
    assert [s for s, _ in got] == [s for s, _ in wanted]
    assert [v for _, v in got] == pytest.approx([v for _, v in wanted], rel=rel)


def test_tensorboard_holds_what_metrics_jsonl_holds(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "run"
    result = train(train_config(tiny_checkpoint[0], text_data, out, max_steps=6, eval_interval=3, log_interval=1,
                                log=("tensorboard",)))
    scalars, acc = tensorboard_scalars(out / "tensorboard")
    wanted = expected_scalars(records(out))
    assert set(wanted) == set(SCALARS.values())
    for tag, series in wanted.items():
        assert_same_series(scalars[tag], series)  # TensorBoard stores float32
    assert scalars["hparams/final_val_loss"] == [(6, pytest.approx(result.last_val_loss, rel=1e-6))]
    # the hyper-parameters are in the run, for TensorBoard's HPARAMS tab
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = dict(info.session_start_info.hparams)
    assert hparams["model.rank"].number_value == 4 and hparams["run.log"].string_value == "tensorboard"


def test_tensorboard_keeps_one_value_per_step_across_a_resume(tiny_checkpoint, text_data, tmp_path):
    """Steps logged after the last checkpoint and before a crash are trained again on resume:
    TensorBoard must show them once (the resumed values), not twice."""
    import shutil

    out = tmp_path / "run"
    kwargs = dict(max_steps=8, eval_interval=3, log_interval=1, log=("tensorboard",))
    train(train_config(tiny_checkpoint[0], text_data, out, **kwargs), stop_after=4)  # last/ at step 4
    shutil.copytree(out / "last", tmp_path / "last-4")
    train(train_config(tiny_checkpoint[0], text_data, out, **kwargs), resume=True, stop_after=2)  # logs 5, 6
    shutil.rmtree(out / "last")  # a crash after step 6 was logged, before its checkpoint
    shutil.copytree(tmp_path / "last-4", out / "last")
    train(train_config(tiny_checkpoint[0], text_data, out, **kwargs), resume=True)  # 5..8 again
    scalars, _ = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert_same_series(scalars["train/loss"], expected_scalars(records(out))["train/loss"])
    assert [s for s, _ in scalars["val/loss"]] == [3, 6, 8]


def wandb_records(run_folder: Path):
    """The records of an offline W&B run: its .wandb file is a LevelDB-style log of protobufs
    (a 7-byte header, then 32 KiB blocks of checksum, length, kind and data; the checksum is
    the CRC-32 of kind and data, checked so that a misread shows instead of dropping records)."""
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_folder.glob("run-*.wandb")
    data, pos, block, pieces, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer or padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == int.from_bytes(data[pos:pos + 4], "little"), pos
        pos += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def finished_wandb_records(run_folder: Path, timeout: float = 60.0):
    """The records once the run's exit record is written: W&B's service writes the file on its own
    schedule, and `run.finish()` can return before it has (a CI run read a file without its
    records)."""
    deadline = time.time() + timeout
    while True:
        records = wandb_records(run_folder)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.1)


def test_wandb_offline_run_holds_the_config_and_the_values(tiny_checkpoint, text_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "speeches")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    config = train_config(tiny_checkpoint[0], text_data, out, max_steps=6, eval_interval=3, log_interval=1,
                          log=("wandb",))
    result = train(config)
    (folder,) = (out / "wandb").glob("offline-run-*")
    run_id = (out / "wandb-run-id").read_text().strip()
    assert folder.name.endswith(run_id)
    history, summary, run_config, project = {}, {}, {}, None
    found = finished_wandb_records(folder)
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items.pop("_step")] = items
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
        elif kind == "run":
            project = record.run.project
            run_config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    assert project == "speeches", [r.WhichOneof("record_type") for r in found]  # W&B's own environment decides
    for tag, series in expected_scalars(records(out)).items():
        assert_same_series([(step, values[tag]) for step, values in sorted(history.items()) if tag in values],
                           series, rel=1e-12)
    assert run_config["model"]["rank"] == 4 and run_config["run"]["log"] == ["wandb"]
    assert summary["final_val_loss"] == pytest.approx(result.last_val_loss, rel=1e-12)
    # a resumed run continues the same W&B run
    train(train_config(tiny_checkpoint[0], text_data, out, max_steps=8, eval_interval=3, log_interval=1,
                       log=("wandb",)), resume=True)
    assert (out / "wandb-run-id").read_text().strip() == run_id
    assert all(f.name.endswith(run_id) for f in (out / "wandb").glob("offline-run-*"))


def train_args(model, data, out, *more):
    return ("train", "--model", model, "--data", str(data), "--out", str(out), "--targets", "attn", "--rank", "4",
            "--block-size", "32", "--batch-size", "2", "--max-steps", "6", "--eval-interval", "3",
            "--eval-batches", "1", "--log-interval", "1", "--device", "cpu", "--dtype", "float32", *more)


def test_a_logger_that_fails_mid_run_is_dropped_once(tiny_checkpoint, text_data, tmp_path, cli, monkeypatch):
    from lora_gpt2.training.loggers import tensorboard_log

    calls = []
    real = tensorboard_log.TensorBoardLog.on_logged

    def disk_full(self, event):
        calls.append(event.record["step"])
        if event.record["step"] >= 3:
            raise OSError(28, "No space left on device")
        real(self, event)

    monkeypatch.setattr(tensorboard_log.TensorBoardLog, "on_logged", disk_full)
    out = tmp_path / "run"
    code, _, stderr = cli(*train_args(tiny_checkpoint[0], text_data, out, "--log", "tensorboard"))
    assert code == 0
    failures = [line for line in stderr.splitlines() if "failed" in line]
    assert failures == ["--log tensorboard failed (OSError: [Errno 28] No space left on device); "
                        "training goes on without it"]
    assert calls == [1, 2, 3]  # dropped after its first failure
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "last" / "adapter.json").read_text())["step"] == 6
    scalars, _ = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]


def test_wandb_without_credentials_does_not_stop_training(tiny_checkpoint, text_data, tmp_path):
    import subprocess

    from helpers import cli_command, subprocess_env

    env = subprocess_env(WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    env.pop("WANDB_API_KEY", None)  # and no ~/.netrc in this HOME: W&B has no credentials
    out = tmp_path / "run"
    done = subprocess.run(cli_command(*train_args(tiny_checkpoint[0], text_data, out, "--log", "wandb")), env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    (failure,) = [line for line in done.stderr.splitlines() if "--log wandb" in line]
    assert failure.startswith("--log wandb failed (UsageError: No API key configured")
    assert failure.endswith("training goes on without it")
    assert json.loads((out / "last" / "adapter.json").read_text())["step"] == 6


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_and_changes_nothing(tiny_checkpoint, text_data, tmp_path, cli, monkeypatch,
                                                         name):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    out = tmp_path / "run"
    code, _, stderr = cli(*train_args(tiny_checkpoint[0], text_data, out, "--log", name))
    assert code == 1
    assert stderr.strip() == (f"lora-gpt2: error: --log {name} needs the {name} package: "
                              f"pip install 'lora-gpt2[{name}]'")
    assert not out.exists()


def test_torn_metrics_lines_are_skipped(tmp_path):
    from lora_gpt2.training import metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n[1, 2]\n{"step": "3"}\n'
                    '{"step": 4, "train_loss": 1.5}\n{"step": 5, "tr')
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 4]
    metrics.truncate_after(path, 3)
    assert path.read_text() == '{"step": 1, "train_loss": 2.0}\n'


def test_draw_loss_leaves_the_callers_matplotlib_alone(tmp_path):
    import matplotlib

    from lora_gpt2.training.plot import draw_loss

    backend = matplotlib.get_backend()
    (tmp_path / "m.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "train_loss": 2.0, "val_loss": 2.5}\n')
    assert draw_loss(tmp_path / "m.jsonl", tmp_path / "loss.png")
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_subscribers_receive_typed_events_in_order(tiny_checkpoint, text_data, tmp_path):
    from lora_gpt2.training import Subscriber, train

    class Recorder(Subscriber):
        def __init__(self):
            self.events = []

        def handle(self, event):
            self.events.append(event)

    recorder = Recorder()
    result = train(train_config(tiny_checkpoint[0], text_data, tmp_path / "run", max_steps=4, eval_interval=2,
                                log_interval=1), subscribers=[recorder])
    names = [(e.kind, e.path.name if e.kind == "saved" else getattr(e, "step", None)) for e in recorder.events]
    best_saves = [i for i, n in enumerate(names) if n == ("saved", "best")]
    assert all(names[i - 1][0] == "evaluated" and recorder.events[i - 1].best for i in best_saves)
    assert ("saved", "best") == names[5]  # the first evaluation is always the best so far
    assert [n for n in names if n != ("saved", "best")] == [
        ("started", 0),
        ("stepped", 1), ("logged", None),
        ("stepped", 2), ("evaluated", 2), ("logged", None), ("saved", "last"),
        ("stepped", 3), ("logged", None),
        ("stepped", 4), ("evaluated", 4), ("logged", None), ("saved", "last"),
        ("finished", None)]
    logged = [e.record for e in recorder.events if e.kind == "logged"]
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == on_disk and recorder.events[-1].result == result
