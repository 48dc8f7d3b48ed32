"""Property-based tests: the LoRA algebra for random shapes, and a CLI that never shows a traceback."""

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_gpt2.adapters import lora
from lora_gpt2.cli import main

from helpers import SAMPLE_TEXT, make_hf_model

sizes = st.integers(min_value=1, max_value=48)
ranks = st.integers(min_value=1, max_value=16)
alphas = st.one_of(st.none(), st.floats(min_value=0.01, max_value=64, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(n_in=sizes, n_out=sizes, r=ranks, alpha=alphas, bias=st.booleans(), seed=st.integers(0, 2**31))
def test_linear_update_is_scaling_b_a_and_merge_round_trips(n_in, n_out, r, alpha, bias, seed):
    torch.manual_seed(seed)
    layer = lora.Linear(n_in, n_out, bias, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_b.normal_()
    scaling = (r if alpha is None else alpha) / r
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(5, n_in)
    update = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(update, x @ (scaling * layer.lora_b @ layer.lora_a).T, rtol=1e-4, atol=1e-4)
    before, weight = layer(x), layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.weight - weight, scaling * layer.lora_b @ layer.lora_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    tolerance = 4 * torch.finfo(torch.float32).eps * (1 + (scaling * layer.lora_b @ layer.lora_a).abs().max())
    assert (layer.weight - weight).abs().max() <= tolerance


@settings(max_examples=40, deadline=None)
@given(num=sizes, dim=sizes, r=ranks, alpha=alphas, seed=st.integers(0, 2**31))
def test_embedding_update_is_scaling_b_a_and_merge_round_trips(num, dim, r, alpha, seed):
    torch.manual_seed(seed)
    layer = lora.Embedding(num, dim, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_b.normal_()
    scaling = (r if alpha is None else alpha) / r
    ids = torch.randint(0, num, (7,))
    delta = (scaling * layer.lora_b @ layer.lora_a).T  # (num, dim)
    torch.testing.assert_close(layer(ids) - layer.weight[ids], delta[ids], rtol=1e-4, atol=1e-4)
    before, weight = layer(ids), layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(ids), before, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    assert (layer.weight - weight).abs().max() <= 4 * torch.finfo(torch.float32).eps * (1 + delta.abs().max())


# ------------------------------------------------------------------ the CLI under random input
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, prepared data and a trained run, made once; the fuzzer writes nowhere else."""
    from lora_gpt2.data import ensure_prepared
    from lora_gpt2.training import train

    from helpers import train_config

    root = tmp_path_factory.mktemp("fuzz")
    make_hf_model().save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "input.txt").write_text(SAMPLE_TEXT)
    ensure_prepared(root / "data")
    train(train_config(str(root / "model"), root / "data", root / "run", max_steps=2, eval_interval=2))
    return root


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def run_cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


weird_numbers = st.one_of(
    st.sampled_from(["1", "2", "4", "0.5", "0.01", "16"]),  # values a run accepts, so some runs do train
    st.sampled_from(["-1", "0", "1e30", "-1e30", "nan", "inf", "-inf", "", "9" * 30, "abc", "2.5", "-0"]),
)
weird_paths = st.sampled_from(["", "does/not/exist", "/", "..", "-x", "model", "data", "run"])
TRAIN_OPTIONS = ["--rank", "--alpha", "--dropout", "--lr", "--batch-size", "--block-size", "--grad-accum",
                 "--max-steps", "--epochs", "--warmup-steps", "--weight-decay", "--grad-clip",
                 "--eval-interval", "--eval-batches", "--seed", "--beta1", "--min-lr-ratio"]
GENERATE_OPTIONS = ["--temperature", "--top-k", "--top-p", "--seed", "--max-new-tokens"]


def assert_clean(code: int, err: str) -> None:
    assert code in (0, 1), (code, err)
    assert "Traceback" not in err, err
    if code == 1:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("lora-gpt2: error: "), err
        assert sum(line.startswith("lora-gpt2: error:") for line in lines) == 1, err


def resolve(world: Path, value: str) -> str:
    return str(world / value) if value in ("model", "data", "run") else value


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(TRAIN_OPTIONS), weird_numbers, max_size=4),
       model=st.one_of(st.just("model"), weird_paths), data=st.one_of(st.just("data"), weird_paths),
       targets=st.one_of(st.just("attn"), st.sampled_from(["", "nope", "all", "lm_head,ffn", "embeddings"])),
       dtype=st.one_of(st.just("float32"), st.sampled_from(["bfloat16", "", "float8", "float16"])))
def test_train_never_shows_a_traceback_or_writes_outside_out(world, tmp_path, options, model, data, targets, dtype):
    out = tmp_path / f"out-{os.urandom(4).hex()}"
    before = snapshot(world)
    args = ["train", "--model", resolve(world, model), "--data", resolve(world, data), "--out", str(out),
            "--targets", targets, "--dtype", dtype, "--device", "cpu", "--stop-after", "1",
            "--block-size", "32", "--batch-size", "2", "--eval-batches", "1"]  # drawn options come later and win
    for option, value in options.items():
        args += [option, value]
    code, err = run_cli(args)
    if os.environ.get("FUZZ_DEBUG"):
        print(code, err.strip().splitlines()[-1:] if code else "ok")
    assert_clean(code, err)
    assert snapshot(world) == before  # nothing outside --out was touched


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(GENERATE_OPTIONS), weird_numbers, max_size=4),
       adapter=st.one_of(st.just("run"), weird_paths), num_samples=st.sampled_from(["1", "2", "0", "-1", "x"]))
def test_generate_never_shows_a_traceback(world, options, adapter, num_samples):
    before = snapshot(world)
    args = ["generate", "hello", "--adapter", resolve(world, adapter), "--device", "cpu",
            "--num-samples", num_samples, "--model", str(world / "model")]
    for option, value in options.items():
        # a huge but valid token count is a legitimately long job, not a mistake: keep runs short
        if option == "--max-new-tokens" and value not in ("-1", "", "abc", "nan", "2.5", "-0"):
            value = "3"
        args += [option, value]
    code, err = run_cli(args)
    if os.environ.get("FUZZ_DEBUG"):
        print(code, err.strip().splitlines()[-1:] if code else "ok")
    assert_clean(code, err)
    assert snapshot(world) == before
