"""download-data against a real loopback HTTP server: success, retries, and every failure."""

import hashlib
import json
import re
import time

import numpy as np
import pytest

from lora_gpt2 import tokenizer
from lora_gpt2.data.download import RetryPolicy, fetch
from lora_gpt2.errors import DownloadError

from helpers import SAMPLE_TEXT
from httpserver import serve

BODY = SAMPLE_TEXT.encode()
SHA = hashlib.sha256(BODY).hexdigest()
FAST = RetryPolicy(attempts=3, backoff=0.0, connect_timeout=2, read_timeout=2)


@pytest.fixture
def server():
    with serve(BODY) as s:
        yield s


def test_download_data_fetches_verifies_and_prepares(server, tmp_path, cli):
    code, out, err = cli("download-data", "--data-dir", tmp_path, "--url", server.url + "/ok", "--sha256", SHA)
    assert code == 0, err
    assert (tmp_path / "input.txt").read_bytes() == BODY
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["source_url"] == server.url + "/ok" and meta["source_sha256"] == SHA
    assert f"train: {meta['train_tokens']:,} tokens" in err and f"val: {meta['val_tokens']:,} tokens" in err
    assert out == ""
    assert server.hits["/ok"] == 1


def test_present_copy_is_not_fetched_again_and_force_fetches(server, tmp_path, cli):
    args = ("download-data", "--data-dir", tmp_path, "--url", server.url + "/ok", "--sha256", SHA)
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert code == 0 and "already present and verified; not downloading it again" in err
    assert "token files are up to date" in err
    assert server.hits["/ok"] == 1
    assert cli(*args, "--force")[0] == 0
    assert server.hits["/ok"] == 2


def test_404_is_one_line_naming_the_url(server, tmp_path, cli):
    code, _, err = cli("download-data", "--data-dir", tmp_path, "--url", server.url + "/nothing")
    assert code == 1
    assert err.strip().splitlines()[-1] == f"lora-gpt2: error: download of {server.url}/nothing failed: HTTP 404 Not Found"
    assert server.hits["/nothing"] == 1  # 4xx is not retried
    assert not list(tmp_path.iterdir())


def test_500_then_200_is_retried(server, tmp_path):
    fetch(server.url + "/flaky", tmp_path / "input.txt", sha256=SHA, policy=FAST)
    assert (tmp_path / "input.txt").read_bytes() == BODY and server.hits["/flaky"] == 2


def test_5xx_after_retries_fails(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/always-500 failed after 3 attempts: HTTP 503"):
        fetch(server.url + "/always-500", tmp_path / "input.txt", policy=FAST)
    assert server.hits["/always-500"] == 3 and not list(tmp_path.iterdir())


def test_connection_dropped_mid_body_is_retried(server, tmp_path):
    fetch(server.url + "/drop-once", tmp_path / "input.txt", sha256=SHA, policy=FAST)
    assert (tmp_path / "input.txt").read_bytes() == BODY and server.hits["/drop-once"] == 2


def test_body_shorter_than_content_length_fails_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/short failed after 3 attempts: .*(shorter than Content-Length|dropped mid-body)"):
        fetch(server.url + "/short", tmp_path / "input.txt", policy=FAST)
    assert not list(tmp_path.iterdir())


def test_checksum_mismatch_leaves_a_good_file_untouched(server, tmp_path, cli):
    (tmp_path / "input.txt").write_bytes(BODY)
    code, _, err = cli("download-data", "--data-dir", tmp_path, "--url", server.url + "/corrupt",
                       "--sha256", SHA, "--force")
    assert code == 1
    assert f"checksum mismatch for {server.url}/corrupt" in err and f"expected {SHA}" in err
    assert (tmp_path / "input.txt").read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


def test_connection_refused_names_the_url(tmp_path, cli):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/input.txt"
    code, _, err = cli("download-data", "--data-dir", tmp_path, "--url", url, "--retries", "0")
    assert code == 1
    assert err.strip().splitlines()[-1] == f"lora-gpt2: error: download of {url} failed after 1 attempts: connection refused"


def test_file_url_and_prepared_tokens_decode_back(tmp_path, cli):
    src = tmp_path / "src.txt"
    src.write_bytes(BODY)
    data = tmp_path / "data"
    code, _, err = cli("download-data", "--data-dir", data, "--url", src.as_uri())
    assert code == 0, err
    meta = json.loads((data / "meta.json").read_text())
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert (train.size, val.size) == (meta["train_tokens"], meta["val_tokens"])
    split = int(len(SAMPLE_TEXT) * 0.9)
    assert tokenizer.decode(train.tolist()) == SAMPLE_TEXT[:split]
    assert tokenizer.decode(val.tolist()) == SAMPLE_TEXT[split:]
    assert tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist()) == SAMPLE_TEXT


def test_unwritable_data_dir_is_one_line(tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be made inside a file, even as root
    code, _, err = cli("download-data", "--data-dir", blocker / "sub", "--url", (tmp_path / "x").as_uri())
    assert code == 1
    assert err.strip().splitlines()[-1] == f"lora-gpt2: error: cannot create data directory {blocker / 'sub'}: Not a directory"


def test_bad_sha256_option(tmp_path, cli):
    code, _, err = cli("download-data", "--data-dir", tmp_path, "--sha256", "xyz")
    assert (code, err.strip()) == (1, "lora-gpt2: error: --sha256 must be 64 hex digits, got 'xyz'")


@pytest.mark.parametrize("route, message", [
    ("binary", r"/binary is binary \(a NUL byte at offset 3\), not UTF-8 text; nothing was saved"),
    ("latin1", r"/latin1 is not UTF-8 text \(invalid byte at offset 3\); nothing was saved"),
    ("empty", r"/empty is empty; nothing was saved"),
])
def test_a_body_that_is_not_text_is_refused_and_the_old_file_kept(server, tmp_path, cli, route, message):
    (tmp_path / "input.txt").write_bytes(BODY)
    code, _, err = cli("download-data", "--data-dir", tmp_path, "--url", f"{server.url}/{route}", "--force")
    assert code == 1
    assert re.search(message, err.strip().splitlines()[-1]), err
    assert (tmp_path / "input.txt").read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]
    assert server.hits[f"/{route}"] == 1  # the content, not the connection: not retried


def test_file_url_of_a_binary_file_is_refused(tmp_path, cli):
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(range(256)) * 10)
    data = tmp_path / "data"
    code, _, err = cli("download-data", "--data-dir", data, "--url", src.as_uri())
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"lora-gpt2: error: {src.as_uri()} is binary (a NUL byte at offset 0), not UTF-8 text; nothing was saved")
    assert list(data.iterdir()) == []


def test_utf8_character_split_across_blocks_is_text(tmp_path):
    from lora_gpt2.data import download

    text = ("é" * (download.CHUNK // 2 + 1) + "\n").encode()  # a 2-byte char straddles each block end
    src = tmp_path / "src.txt"
    src.write_bytes(text)
    fetch(src.as_uri(), tmp_path / "input.txt", policy=FAST)
    assert (tmp_path / "input.txt").read_bytes() == text


def test_a_trickling_server_is_given_up_on_at_the_deadline(server, tmp_path, cli):
    import time

    server.trickle_every = 0.1  # far below the read timeout: only the deadline can stop it
    start = time.monotonic()
    code, _, err = cli("download-data", "--data-dir", tmp_path, "--url", server.url + "/trickle", "--timeout", "1.5")
    took = time.monotonic() - start
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lora-gpt2: error: download of {server.url}/trickle gave up after 1.5 s (the --timeout) with ")
    received = int(last.split(" with ")[1].split(" bytes")[0].replace(",", ""))
    assert 3 <= received < len(BODY)
    assert 1.5 <= took < 6
    assert server.hits["/trickle"] == 1 and list(tmp_path.iterdir()) == []


def _wait_for(predicate, seconds=30.0):
    import time

    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_during_download_leaves_no_temporary(server, tmp_path, name, code):
    import signal
    import subprocess

    from helpers import cli_command, subprocess_env

    server.trickle_every = 0.05
    proc = subprocess.Popen(cli_command("download-data", "--data-dir", tmp_path, "--url", server.url + "/trickle"),
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()))
    time.sleep(0.5)  # mid-body: bytes are arriving
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"lora-gpt2: error: stopped by {name}"
    assert list(tmp_path.iterdir()) == []


def test_a_later_download_removes_a_killed_downloads_temporary_but_not_a_live_one(server, tmp_path, cli):
    import signal
    import subprocess

    from helpers import cli_command, subprocess_env

    server.trickle_every = 0.05
    proc = subprocess.Popen(cli_command("download-data", "--data-dir", tmp_path, "--url", server.url + "/trickle"),
                            env=subprocess_env(), stderr=subprocess.DEVNULL)
    _wait_for(lambda: any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()))
    time.sleep(0.5)  # mid-body: bytes are arriving
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    dead = tmp_path / f".tmp-{proc.pid}-input.txt"
    assert dead.is_file()  # SIGKILL runs no cleanup
    writer = subprocess.Popen(["sleep", "60"])  # stands for another download in progress
    live = tmp_path / f".tmp-{writer.pid}-input.txt"
    live.write_bytes(b"in progress")
    try:
        code, _, err = cli("download-data", "--data-dir", tmp_path, "--url", server.url + "/ok")
        assert code == 0, err
        assert not dead.exists() and live.read_bytes() == b"in progress"
        assert (tmp_path / "input.txt").read_bytes() == BODY
    finally:
        writer.kill()
        writer.wait()


def test_a_jsonl_url_keeps_its_name_and_is_prepared_as_examples(tmp_path, cli):
    records = [{"prompt": f"P{i}:", "completion": f" c{i}"} for i in range(20)]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = tmp_path / "data"
    code, _, err = cli("download-data", "--data-dir", data, "--url", src.as_uri())
    assert code == 0, err
    assert (data / "qa.jsonl").read_bytes() == src.read_bytes() and not (data / "input.txt").exists()
    meta = json.loads((data / "qa.meta.json").read_text())
    assert (meta["kind"], meta["train_examples"], meta["val_examples"]) == ("prompt/completion", 18, 2)
    assert f"train: {meta['train_tokens']:,} tokens in 18 examples" in err
    assert np.fromfile(data / "qa.train.idx", dtype=np.int64).size == 18 * 3
