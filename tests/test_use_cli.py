"""generate / eval / merge / export from the command line."""

import json
import sys

import pytest
import torch

from lora_gpt2 import tokenizer

from helpers import train_config


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, text_data, tmp_path_factory):
    from lora_gpt2.training import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(train_config(tiny_checkpoint[0], text_data, out, targets=("attn", "lm_head"), max_steps=8, eval_interval=4))
    return out


def test_same_seed_same_samples_and_different_seed_differs(run_dir, cli):
    args = ("generate", "ROMEO:", "--adapter", run_dir, "--max-new-tokens", "15", "--num-samples", "2",
            "--device", "cpu", "--json")
    code, out, err = cli(*args, "--seed", "5")
    assert code == 0, err
    samples = [json.loads(line) for line in out.splitlines()]
    assert len(samples) == 2 and all(s["prompt"] == "ROMEO:" for s in samples)
    assert cli(*args, "--seed", "5")[1] == out
    assert cli(*args, "--seed", "6")[1] != out
    assert "tokens/s" in err


def test_greedy_cli_output_equals_transformers_generate(run_dir, tiny_checkpoint, tmp_path, cli):
    from transformers import GPT2LMHeadModel

    code, _, err = cli("merge", run_dir, tmp_path / "merged")
    assert code == 0, err
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    prompt = "JULIET: What say you"
    ids = torch.tensor([tokenizer.encode(prompt)])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           pad_token_id=0)[0, ids.size(1):].tolist()
    code, out, err = cli("generate", prompt, "--adapter", run_dir, "--temperature", "0",
                         "--max-new-tokens", "12", "--device", "cpu", "--top-k", "1")
    assert code == 0, err
    assert out == prompt + tokenizer.decode(expected) + "\n"


def test_text_streams_to_stdout_piece_by_piece(run_dir, monkeypatch):
    """At every flush stdout holds the prompt and the session's pieces so far: one more piece each time."""
    from lora_gpt2.checkpoints.reading import load_with_adapter
    from lora_gpt2.cli import main
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.session import GenerationSession

    class Recorder:
        def __init__(self):
            self.text, self.flushed = "", []

        def write(self, s):
            self.text += s

        def flush(self):
            if not self.flushed or self.flushed[-1] != self.text:
                self.flushed.append(self.text)

        def isatty(self):
            return False

    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "Hi", "--adapter", str(run_dir), "--max-new-tokens", "25", "--device", "cpu",
              "--seed", "4", "--temperature", "0.8", "--top-k", "200"])
    assert exc.value.code == 0
    monkeypatch.undo()
    net, _ = load_with_adapter(str(run_dir), dtype="auto", device="cpu")
    session = GenerationSession(net)
    pieces = list(session.stream("Hi", SamplingConfig(25, 0.8, 200), session.generator(4)))
    expected = ["Hi" + "".join(pieces[: i + 1]) for i in range(len(pieces))]
    assert stdout.flushed[: len(pieces)] == expected and stdout.text == expected[-1] + "\n"


def test_prompt_from_file_and_stdin(run_dir, tmp_path, cli, monkeypatch):
    import io

    (tmp_path / "p.txt").write_text("KING:")
    code, out, _ = cli("generate", "--prompt-file", tmp_path / "p.txt", "--adapter", run_dir,
                       "--max-new-tokens", "3", "--device", "cpu")
    assert code == 0 and out.startswith("KING:")
    monkeypatch.setattr(sys, "stdin", io.StringIO("QUEEN:"))
    code, out, _ = cli("generate", "--adapter", run_dir, "--max-new-tokens", "3", "--device", "cpu")
    assert code == 0 and out.startswith("QUEEN:")


def test_eval_agrees_with_the_runs_metrics(run_dir, cli):
    code, out, err = cli("eval", "--adapter", run_dir / "last", "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result["adapter"]["loss"] == pytest.approx(logged[-1]["val_loss"], abs=1e-6)
    assert result["base"]["loss"] > result["adapter"]["loss"]


def test_export_then_generate_from_the_peft_folder_gives_the_same_text(run_dir, tiny_checkpoint, tmp_path, cli):
    code, _, err = cli("export", "--format", "peft", run_dir, tmp_path / "peft")
    assert code == 0, err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "lm_head"] and config["peft_type"] == "LORA"
    args = ("--max-new-tokens", "10", "--temperature", "0", "--device", "cpu")
    ours = cli("generate", "A", "--adapter", run_dir, *args)[1]
    theirs = cli("generate", "A", "--adapter", tmp_path / "peft", "--model", tiny_checkpoint[0], *args)[1]
    assert ours == theirs


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["--max-new-tokens", "-3"], "max-new-tokens must be >= 0, got -3"),
    (["--adapter", "/no/such/adapter"], "adapter '/no/such/adapter' does not exist"),
    (["--dtype", "int8"], "dtype must be one of auto, float32, bfloat16, float16; got 'int8'"),
])
def test_generate_errors_are_one_line(run_dir, cli, args, message):
    full = ["generate", "x", "--device", "cpu"] + (args if "--adapter" in args else ["--adapter", str(run_dir)] + args)
    code, out, err = cli(*full)
    # the only line: a bad setting is refused before the model loads (gpt2-xl takes seconds to load)
    assert code == 1 and err.strip().splitlines() == [f"lora-gpt2: error: {message}"]


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/data.txt"], "data '/no/such/data.txt' not found: give a text, JSONL or CSV file, or a folder"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--eval-batches", "-2"], "--eval-batches must be >= 1, got -2"),
    (["--block-size", "0"], "--block-size must be >= 1, got 0"),
])
def test_eval_errors_come_before_the_model_loads(run_dir, cli, args, message):
    code, out, err = cli("eval", "--adapter", run_dir, "--device", "cpu", *args)
    assert code == 1 and err.strip().splitlines() == [f"lora-gpt2: error: {message}"]


def test_prompt_longer_than_the_context_with_no_new_tokens(run_dir, cli):
    code, _, err = cli("generate", ("word " * 100).strip(), "--adapter", run_dir, "--max-new-tokens", "0", "--device", "cpu")
    assert code == 1
    assert err.strip().splitlines()[-1] == ("lora-gpt2: error: prompt has 100 tokens, longer than the model's "
                                            "context of 64, and --max-new-tokens is 0")


def test_export_of_unknown_format(run_dir, tmp_path, cli):
    code, _, err = cli("export", "--format", "onnx", run_dir, tmp_path / "x")
    assert code == 1 and "unknown export format 'onnx'; supported: peft, gguf, gguf-lora" in err


@pytest.mark.parametrize("samples", ["1", "3"])
def test_max_new_tokens_0_generates_nothing_and_exits_0(run_dir, cli, samples):
    """0 new tokens is a valid request (as OpenAI's max_tokens 0): the prompt alone, finish "length"."""
    code, out, err = cli("generate", "KING:", "--adapter", run_dir, "--max-new-tokens", "0", "--num-samples", samples,
                         "--json", "--device", "cpu")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == int(samples) and all(
        (s["completion"], s["tokens"], s["finish_reason"]) == ("", 0, "length") for s in lines)
    code, out, err = cli("generate", "KING:", "--adapter", run_dir, "--max-new-tokens", "0", "--device", "cpu")
    assert code == 0 and out == "KING:\n", err


def test_a_prompt_on_stdin_that_is_not_utf8_is_named_as_such(run_dir):
    import subprocess

    from helpers import cli_command, subprocess_env

    done = subprocess.run(cli_command("generate", "--adapter", run_dir, "--max-new-tokens", "2", "--device", "cpu"),
                          input=b"KING \xff said", capture_output=True, env=subprocess_env())
    assert done.returncode == 1 and done.stderr.decode().strip().splitlines() == [
        "lora-gpt2: error: the prompt read from stdin is not UTF-8 text (invalid byte at offset 5)"]
    done = subprocess.run(cli_command("generate", "--adapter", run_dir, "--max-new-tokens", "2", "--device", "cpu"),
                          input="KING é said".encode(), capture_output=True, env=subprocess_env())
    assert done.returncode == 0 and done.stdout.decode().startswith("KING é said")
