"""`serve --watch NAME=RUN_DIR`: a run followed while it trains, each new checkpoint served, the last
good one kept through damage and deletion, another base refused; and a real `lora-gpt2 train`
beside a real `lora-gpt2 serve`."""

import shutil
import subprocess
import time

import pytest

from lora_gpt2 import load_pretrained
from lora_gpt2.checkpoints import adapter_dir
from lora_gpt2.config import LoRAConfig

from helpers import cli_command, make_hf_model, randomize_adapters, save_hf_model, subprocess_env
from serving import KEY, base_engine, free_port, greedy_text, running_server

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = LoRAConfig(targets=("attn",), r=4, alpha=8.0)


def complete(url, model="live", prompt="The quick brown", n=12):
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_watch_serves_each_new_checkpoint_and_keeps_the_last_good_one(world, tmp_path):
    from lora_gpt2.serve.watch import Watch

    base, _, _ = world
    models = {step: randomize_adapters(load_pretrained(base, lora=CONFIG).eval(), seed=step, scale=0.1)
              for step in (4, 8, 12)}
    run = tmp_path / "run"
    engine = base_engine(base).start()
    try:
        with running_server(engine) as url:
            watch = Watch(engine, "live", run, "best")
            assert not watch.check()
            assert httpx.get(url + "/health").json()["watched"]["live"]["status"] == "waiting"
            for step in (4, 8):
                adapter_dir.save_checkpoint(run / "best", models[step], None, step=step, val_loss=3.0 - step / 10)
                assert watch.check() and not watch.check()  # loaded once, then nothing new
                got = complete(url)
                assert got["choices"][0]["text"] == greedy_text(models, step, "The quick brown", 12)
                assert got["system_fingerprint"] == f"live@step-{step}"
                health = httpx.get(url + "/health").json()
                assert health["watched"]["live"]["status"] == "serving"
                assert health["served"]["live"]["step"] == step
                assert health["served"]["live"]["val_loss"] == pytest.approx(3.0 - step / 10)
            # a new checkpoint whose tensors are damaged: not served, said so, step 8 still answers
            adapter_dir.save_checkpoint(run / "best", models[12], None, step=12)
            weights = run / "best" / "adapter.safetensors"
            weights.write_bytes(weights.read_bytes()[:-64])
            assert not watch.check()
            status = httpx.get(url + "/health").json()["watched"]["live"]
            assert status["status"] == "error" and "does not match the sha256" in status["message"]
            assert status["message"].endswith("serving live@step-8") and status["step"] == 8
            assert complete(url)["system_fingerprint"] == "live@step-8"
            shutil.rmtree(run)  # the run deleted: the last good version goes on answering
            assert not watch.check()
            status = httpx.get(url + "/health").json()["watched"]["live"]
            assert status["status"] == "missing" and "serving live@step-8" in status["message"]
            assert complete(url)["choices"][0]["text"] == greedy_text(models, 8, "The quick brown", 12)
            assert engine.bank.loaded == ["live\x002"]  # version 2 (step 8) alone: version 1 was freed
    finally:
        engine.stop()


def test_a_watched_run_of_another_base_is_refused_by_name(world, tmp_path, cli):
    from lora_gpt2.serve.watch import Watch

    base, _, _ = world
    other = save_hf_model(make_hf_model(seed=99, n_positions=512), tmp_path / "other-base")
    adapter_dir.save_checkpoint(tmp_path / "run" / "best", load_pretrained(other, lora=CONFIG), None, step=2)
    engine = base_engine(base).start()
    try:
        messages = []
        watch = Watch(engine, "live", tmp_path / "run", "best", report=messages.append)
        assert not watch.check()
        assert "fingerprint" in engine.adapters.watching["live"]["message"] and "live" not in engine.adapters.current
        assert len(messages) == 1 and "fingerprint" in messages[0]
    finally:
        engine.stop()
    # at start-up, the same run is one line and exit 1
    code, _, err = cli("serve", "--model", base, "--watch", f"live={tmp_path / 'run'}", "--port", str(free_port()))
    assert code == 1 and "fingerprint" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("serve", "--model", base, "--watch", f"live={tmp_path / 'run'}", "--watch-which", "newest")
    assert code == 1 and "--watch-which must be one of best, last, got 'newest'" in err
    code, _, err = cli("serve", "--model", base, "--watch", "live")
    assert code == 1 and "--watch must be NAME=RUN_DIR, got 'live'" in err


TRAIN = ["--targets", "qkv_projection", "--rank", "4", "--block-size", "32", "--batch-size", "4", "--dtype", "float32",
         "--device", "cpu", "--eval-batches", "2", "--dropout", "0", "--lr", "5e-2", "--warmup-steps", "1"]


@pytest.mark.slow
def test_serving_a_run_while_lora_gpt2_train_writes_it(tiny_checkpoint, text_data, tmp_path, cli):
    base, run, port = tiny_checkpoint[0], tmp_path / "run", free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen(cli_command("serve", "--model", base, "--watch", f"live={run}", "--watch-which", "last",
                                         "--port", port), env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:  # the run does not exist yet: served once it does
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.time() < deadline and serve.poll() is None, "serve did not start"
                time.sleep(0.2)
        assert health["watched"]["live"]["status"] == "waiting" and health["adapters"] == 0
        texts = {}
        for steps, resume in ((4, ()), (8, ("--resume",))):
            train = subprocess.run(cli_command("train", "--model", base, "--data", text_data, "--out", run, *TRAIN,
                                               "--max-steps", steps, "--eval-interval", 4, *resume),
                                   env=subprocess_env(), capture_output=True, text=True, timeout=300)
            assert train.returncode == 0, train.stderr
            deadline = time.time() + 30
            while httpx.get(url + "/health", timeout=5).json()["served"].get("live", {}).get("step") != steps:
                assert time.time() < deadline, "the new checkpoint was not served"
                time.sleep(0.1)
            got = complete(url, prompt="ROMEO:", n=16)
            assert got["system_fingerprint"] == f"live@step-{steps}"
            code, out, err = cli("generate", "ROMEO:", "--adapter", run / "last", "--temperature", "0",
                                 "--max-new-tokens", "16", "--device", "cpu", "--top-k", "1")
            assert code == 0, err
            assert "ROMEO:" + got["choices"][0]["text"] + "\n" == out
            texts[steps] = out
        assert texts[4] != texts[8]
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err
    assert "watch live: waiting for" in err and "watch live: step 4" in err and "watch live: step 8" in err
    assert not any(p.name.startswith(".tmp-") for p in run.rglob("*"))
