"""Training on example data: the loss of a step counts every target of the step once, whatever the
micro-batching; eval, resume, DDP and generate see the data as training did."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2.training import train

from helpers import ROOT, SAMPLE_TEXT, cli_command, subprocess_env, train_config

# unequal prompts and completions: micro-batches count very different numbers of targets
PAIRS = [{"prompt": f"Question {i}: " + "tell me more " * (i % 6), "completion": " Answer" + " yes" * (1 + i % 9)}
         for i in range(64)]


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:56]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS[56:]))
    return folder


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """Conversations of 1 to 4 exchanges, some with a system message and weight-0 answers."""
    from test_chat_data import conversations

    rows = conversations(64)
    for i, row in enumerate(rows):
        if i % 5 == 0 and len(row["messages"]) > 3:
            next(m for m in row["messages"] if m["role"] == "assistant")["weight"] = 0
    folder = tmp_path_factory.mktemp("talk")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:56]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[56:]))
    return folder


def records(out):
    """metrics.jsonl without its timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("data", ["qa", "talk"])
def test_one_step_with_grad_accum_4_equals_one_step_on_the_4x_batch(tiny_checkpoint, data, request, tmp_path):
    path, _ = tiny_checkpoint
    qa = request.getfixturevalue(data)
    common = dict(max_steps=1, eval_interval=1, warmup_steps=0, targets=("attn", "lm_head"), block_size=24,
                  eval_batches=8)  # every val example, whichever the batch size
    train(train_config(path, qa, tmp_path / "accum", batch_size=2, grad_accum=4, **common))
    train(train_config(path, qa, tmp_path / "whole", batch_size=8, grad_accum=1, **common))
    a = load_file(tmp_path / "accum" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "whole" / "last" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)
    ra, rb = records(tmp_path / "accum")[-1], records(tmp_path / "whole")[-1]
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
    assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-6)  # eval counts targets, not batches


def test_the_step_loss_is_over_all_counted_targets_not_a_mean_of_micro_batch_means(tiny_checkpoint, qa):
    """Pins the arithmetic the test above relies on, against the loss computed by hand."""
    from lora_gpt2.training import distributed
    from lora_gpt2.training import factory

    cfg = train_config(tiny_checkpoint[0], qa, qa.parent / "probe-run", batch_size=2, grad_accum=4, max_steps=1,
                       targets=("attn",), block_size=24)
    run = factory.build(cfg, distributed.setup("cpu"), "no")
    try:
        sums, counts = [], []
        with torch.no_grad():
            for micro in range(4):
                batch = run.batches.get(0, micro)
                x, y = batch.x, batch.y
                sums.append(run.model(x, targets=y, reduction="sum").item())
                counts.append(int((y >= 0).sum()))
        assert len(set(counts)) > 1 and run.batches.counted(0) == sum(counts)
        right = sum(sums) / sum(counts)
        wrong = sum(s / c for s, c in zip(sums, counts)) / 4
        assert abs(right - wrong) > 1e-3  # unequal masks: the two definitions really differ
        from lora_gpt2.training import Trainer

        loss, counted, _ = Trainer(run).train_step()
        assert counted == sum(counts)
        assert loss == pytest.approx(right, rel=1e-5)
    finally:
        run.lock.release()


def test_resume_on_jsonl_is_bit_identical(tiny_checkpoint, qa, tmp_path):
    path, _ = tiny_checkpoint
    kwargs = dict(targets=("attn",), max_steps=8, eval_interval=3, log_interval=1, dropout=0.1, block_size=24)
    train(train_config(path, qa, tmp_path / "whole", **kwargs))
    assert train(train_config(path, qa, tmp_path / "split", **kwargs), stop_after=4).step == 4
    train(train_config(path, qa, tmp_path / "split", **kwargs), resume=True)
    a = load_file(tmp_path / "whole" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "last" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "whole") == records(tmp_path / "split")


def test_eval_reproduces_the_logged_val_loss_and_adapter_json_records_the_data(tiny_checkpoint, qa, tmp_path, cli):
    path, _ = tiny_checkpoint
    result = train(train_config(path, qa, tmp_path / "run", max_steps=4, eval_interval=4, block_size=24))
    meta = json.loads((tmp_path / "run" / "best" / "adapter.json").read_text())
    assert meta["eval"]["data_kind"] == "prompt/completion" and meta["eval"]["mask_prompt"] is True
    code, out, err = cli("eval", "--adapter", tmp_path / "run" / "best", "--json", "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    assert report["adapter"]["loss"] == pytest.approx(result.best_val_loss, rel=1e-9, abs=1e-12)
    assert (report["kind"], report["mask_prompt"]) == ("prompt/completion", True)
    code, out, _ = cli("eval", "--adapter", tmp_path / "run" / "best", "--json", "--device", "cpu",
                       "--no-mask-prompt")
    unmasked = json.loads(out)
    assert unmasked["counted_tokens"] > report["counted_tokens"]  # the prompts count too


def test_mask_prompt_on_text_data_is_one_line(tiny_checkpoint, text_data, tmp_path, cli):
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", tmp_path / "r",
                       "--mask-prompt", "--device", "cpu")
    assert code == 1
    assert err.strip().splitlines()[-1].endswith(f"--mask-prompt needs prompt/completion data; "
                                                 f"{text_data / 'input.txt'} is text data")
    assert not (tmp_path / "r").exists()


def test_mask_prompt_cannot_change_on_resume(tiny_checkpoint, qa, tmp_path, cli):
    args = ["train", "--model", tiny_checkpoint[0], "--data", qa, "--out", tmp_path / "r", "--max-steps", "2",
            "--block-size", "24", "--batch-size", "2", "--device", "cpu", "--targets", "attn"]
    assert cli(*args)[0] == 0
    code, _, err = cli(*args, "--resume", "--max-steps", "3", "--no-mask-prompt")
    assert code == 1 and "cannot resume" in err and "mask_prompt False: the run was trained with mask_prompt None" in err


def test_long_examples_are_counted_and_said(tiny_checkpoint, qa, tmp_path, cli):
    code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", qa, "--out", tmp_path / "r",
                       "--max-steps", "1", "--block-size", "8", "--batch-size", "2", "--device", "cpu")
    assert code == 0, err
    import numpy as np

    lengths = np.fromfile(qa / "train.idx", dtype=np.int64).reshape(-1, 3)[:, 2]
    assert f"{int((lengths > 9).sum()):,} of 56 train examples are longer than --block-size 8 + 1 tokens" in err


def test_generate_stops_at_eot_by_default_only_for_example_data():
    from lora_gpt2.cli.use_cmd import stops_at_eot

    class Info:
        def __init__(self, kind):
            self.eval_settings = {"data_kind": kind} if kind else {}

    assert stops_at_eot(None, Info("prompt/completion")) and stops_at_eot(None, Info("examples"))
    assert not stops_at_eot(None, Info("text")) and not stops_at_eot(None, Info("documents"))
    assert not stops_at_eot(None, None) and not stops_at_eot(None, Info(None))
    assert stops_at_eot(True, Info("text")) and not stops_at_eot(False, Info("prompt/completion"))


@pytest.mark.slow
@pytest.mark.parametrize("data", ["qa", "talk"])
def test_ddp_with_masks_equals_one_process(tiny_checkpoint, data, request, tmp_path):
    qa = request.getfixturevalue(data)
    common = ["--model", tiny_checkpoint[0], "--data", qa, "--targets", "attn", "--rank", "4", "--block-size", "24",
              "--max-steps", "3", "--eval-interval", "3", "--grad-accum", "2", "--dtype", "float32",
              "--device", "cpu", "--dropout", "0", "--warmup-steps", "0"]
    single = subprocess.run(cli_command("train", *common, "--out", tmp_path / "single", "--batch-size", "4"),
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lora_gpt2", "train", *map(str, common), "--out", str(tmp_path / "ddp"), "--batch-size", "2"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(tmp_path / "single" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "ddp" / "last" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    ra, rb = records(tmp_path / "single"), records(tmp_path / "ddp")
    assert [r["train_loss"] for r in rb] == pytest.approx([r["train_loss"] for r in ra], rel=1e-5)


@pytest.mark.slow
def test_the_worked_prompt_completion_example_runs_end_to_end(tiny_checkpoint, tmp_path):
    """scripts/shakespeare_to_jsonl.py -> train -> eval -> generate, as the README shows it."""
    play = tmp_path / "input.txt"
    play.write_text(SAMPLE_TEXT)
    speeches = tmp_path / "speeches"
    done = subprocess.run([sys.executable, ROOT / "scripts" / "shakespeare_to_jsonl.py", play, speeches],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (speeches / "train.jsonl").read_text().splitlines()]
    assert lines[1]["prompt"].endswith("\n\nJULIET:") and lines[1]["completion"].startswith("\nWhat say you, Romeo?")
    assert len(lines) + len((speeches / "valid.jsonl").read_text().splitlines()) == SAMPLE_TEXT.count(":\n")
    run = tmp_path / "run"
    for args in (["train", "--model", tiny_checkpoint[0], "--data", speeches, "--out", run, "--max-steps", "3",
                  "--block-size", "48", "--batch-size", "4", "--device", "cpu", "--eval-interval", "3"],
                 ["eval", "--adapter", run, "--device", "cpu", "--json"],
                 ["generate", "ROMEO:", "--adapter", run, "--device", "cpu", "--max-new-tokens", "5", "--json"]):
        done = subprocess.run(cli_command(*args), env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompt"] == "ROMEO:"


def test_packed_rows_give_each_example_exactly_what_it_gets_alone(tiny_checkpoint, qa):
    """Block-diagonal attention and positions restarting at 0: a packed row's loss and gradients
    equal those of the same examples padded one per row."""
    from lora_gpt2.config import LoRAConfig
    from lora_gpt2.data import ExampleBatches, PackedBatches, ensure_prepared, example_rows, open_index, open_tokens
    from lora_gpt2.checkpoints.hf import load_pretrained

    prepared = ensure_prepared(qa)
    tokens, index = open_tokens(prepared.train), open_index(prepared.index_path("train"))
    packed = PackedBatches(tokens, index, batch_size=3, block_size=64, seed=0, mask_prompt=True, accum=2)
    padded = ExampleBatches(tokens, index, batch_size=3, block_size=64, seed=0, mask_prompt=True)
    batch = packed.get(1, micro=1)
    assert int(batch.segments.max()) >= 2  # rows really hold several examples
    rows = packed._step_rows(1, 1)
    ids = [i for row in rows for i in row]
    assert len(ids) == len(set(ids))
    torch.manual_seed(0)
    model = load_pretrained(tiny_checkpoint[0], lora=LoRAConfig(targets=("qkv_projection", "position_embedding"), r=4),
                            dtype=torch.float32, device="cpu")
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ours = model(batch.x, targets=batch.y, reduction="sum", segments=batch.segments)
    grads = torch.autograd.grad(ours, trainable)
    x, y = example_rows(tokens, index[ids], padded.window, True)  # the same examples, one per row
    alone = model(x, targets=y, reduction="sum")
    alone_grads = torch.autograd.grad(alone, trainable)
    assert int((batch.y >= 0).sum()) == int((y >= 0).sum())
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads, alone_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # every example of the epoch is packed exactly once, and the step count follows the rows
    plan = packed._plan(0)
    assert sorted(i for row in plan for i in row) == list(range(len(index)))
    assert packed.epoch_rows() == len(plan) < len(index)


def test_packing_trains_and_resumes_bit_identically(tiny_checkpoint, qa, tmp_path):
    path, _ = tiny_checkpoint
    kwargs = dict(targets=("attn",), max_steps=6, eval_interval=3, log_interval=1, block_size=40, packing=True,
                  epochs=None)
    whole = train(train_config(path, qa, tmp_path / "whole", **kwargs))
    train(train_config(path, qa, tmp_path / "split", **kwargs), stop_after=2)
    train(train_config(path, qa, tmp_path / "split", **kwargs), resume=True)
    a = load_file(tmp_path / "whole" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "last" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "whole") == records(tmp_path / "split")
    assert whole.best_val_loss < records(tmp_path / "whole")[0]["train_loss"] + 1.0


def test_a_first_preparation_shows_its_progress_before_the_run_starts(tiny_checkpoint, tmp_path, cli):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    args = ("train", "--model", tiny_checkpoint[0], "--data", data, "--max-steps", "1", "--block-size", "24",
            "--batch-size", "2", "--device", "cpu")
    code, _, err = cli(*args, "--out", tmp_path / "a")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == "prepare: 64 of 64 examples" and lines[1].startswith("model ")
    code, _, err = cli(*args, "--out", tmp_path / "b")  # prepared already: no bar
    assert code == 0 and "prepare:" not in err
