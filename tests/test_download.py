"""download-data against a real loopback HTTP server: success, retries, and every failure."""

import hashlib
import json

import numpy as np
import pytest

from lora_gpt2 import tokenizer
from lora_gpt2.download import RetryPolicy, fetch
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
