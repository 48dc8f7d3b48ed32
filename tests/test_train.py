"""The training loop: learning, frozen weights, adapter files, exact resume, the gradient norm
and its clipping (LoRA+ included), the schedule, stops and errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2 import load_pretrained
from lora_gpt2.errors import CheckpointError, TrainingStopped
from lora_gpt2.adapters.lora import lora_parameters
from lora_gpt2.training import train

from helpers import built_trainer, train_config

COMPARED = ("step", "train_loss", "val_loss", "lr")


def records(out):
    return [{k: r.get(k) for k in COMPARED} for r in metric_rows(out)]


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_when_overfitting_and_only_lora_changes(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    cfg = train_config(path, text_data, tmp_path / "run", targets=("all",), max_steps=40, lr=1e-2,
                       eval_interval=40, log_interval=1)
    with built_trainer(cfg) as trainer:
        frozen = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
        result = trainer.run()
    losses = [r["train_loss"] for r in records(tmp_path / "run")]
    assert len(losses) == 40 and result.step == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats per token
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_holds_exactly_the_lora_tensors_and_reloads_to_identical_logits(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    cfg = train_config(path, text_data, tmp_path / "run", targets=("attn", "lm_head"), max_steps=6)
    with built_trainer(cfg) as trainer:
        trainer.run()
    last = tmp_path / "run" / "last"
    tensors = load_file(last / "adapter.safetensors")
    assert set(tensors) == set(lora_parameters(trainer.model))
    meta = json.loads((last / "adapter.json").read_text())
    assert meta["step"] == 6 and meta["lora"] == {"targets": ["qkv_projection", "output_projection", "lm_head"],
                                                  "r": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False,
                                                  "layers": None, "variant": "lora", "init": "default"}
    assert meta["base_fingerprint"] == trainer.model.fingerprint and meta["format_version"] == 1
    assert checkpoint.read_checkpoint(tmp_path / "run").path == tmp_path / "run" / "best"  # a run means best/
    ckpt = checkpoint.read_checkpoint(last)
    fresh = load_pretrained(ckpt.info.base_model, lora=ckpt.info.lora)
    checkpoint.load_adapter_tensors(fresh, ckpt)
    idx = torch.randint(0, 50257, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(idx), trainer.model(idx))


def test_adapter_size_is_close_to_the_raw_lora_bytes(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    train(train_config(path, text_data, tmp_path / "run", max_steps=2, eval_interval=2))
    file = tmp_path / "run" / "last" / "adapter.safetensors"
    raw = sum(t.numel() * 4 for t in load_file(file).values())
    assert raw <= file.stat().st_size < raw + 4096


def test_resume_is_bit_identical_to_an_unbroken_run(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    kwargs = dict(targets=("attn",), max_steps=10, eval_interval=3, log_interval=1, dropout=0.1)
    train(train_config(path, text_data, tmp_path / "whole", **kwargs))
    first = train(train_config(path, text_data, tmp_path / "split", **kwargs), stop_after=4)
    assert first.interrupted and first.step == 4
    second = train(train_config(path, text_data, tmp_path / "split", **kwargs), resume=True)
    assert second.step == 10 and not second.interrupted
    a = load_file(tmp_path / "whole" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "last" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "whole") == records(tmp_path / "split")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_checkpoint, text_data, tmp_path, monkeypatch):
    from lora_gpt2.model.gpt2 import GPT2

    path, _ = tiny_checkpoint
    calls = {"n": 0}
    real = GPT2.forward

    def poisoned(self, idx, cache=None, targets=None, **options):
        out = real(self, idx, cache, targets, **options)
        if targets is None or not self.training:
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 5 else out

    monkeypatch.setattr(GPT2, "forward", poisoned)
    cfg = train_config(path, text_data, tmp_path / "run", max_steps=10, eval_interval=100, save_interval=2)
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 6 \(--lr 0.003\); "
                       r"stopped without saving. The last good checkpoint is \S*run/last \(step 4\): continue "
                       r"with --resume and a lower --lr$"):
        train(cfg)
    assert checkpoint.read_adapter_info(tmp_path / "run" / "last").meta["step"] == 4
    assert checkpoint.load_state(tmp_path / "run" / "last")["step"] == 4


def test_existing_run_is_not_overwritten_without_resume(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    cfg = train_config(path, text_data, tmp_path / "run", max_steps=2, eval_interval=2)
    train(cfg)
    with pytest.raises(ValueError, match=r"already holds a run \(at step 2\); pass --resume"):
        train(cfg)


def test_resume_without_a_run_is_refused(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="nothing to resume in"):
        train(train_config(path, text_data, tmp_path / "none"), resume=True)


def test_epochs_set_the_number_of_steps(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    cfg = train_config(path, text_data, tmp_path / "run", max_steps=None, epochs=0.5, eval_interval=1000)
    assert cfg.optim.max_steps is None
    with built_trainer(cfg) as trainer:
        assert trainer.run_.max_steps == math.ceil(0.5 * len(trainer.run_.batches.tokens) / (4 * 32))


def test_block_size_beyond_the_context_is_refused(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint  # n_positions 64
    with pytest.raises(ValueError, match="block_size 128 is longer than the model's context of 64"):
        train(train_config(path, text_data, tmp_path / "run", block_size=128))


def test_bfloat16_training_tracks_float32(tiny_checkpoint, text_data, tmp_path):
    """The bf16 mode's loss curve follows float32's within a tolerance, step by step."""
    path, _ = tiny_checkpoint
    curves = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train(train_config(path, text_data, out, targets=("all",), max_steps=30, lr=1e-2, dtype=dtype,
                           eval_interval=10, log_interval=1))
        curves[dtype] = records(out)
    f32, b16 = curves["float32"], curves["bfloat16"]
    assert [r["step"] for r in f32] == [r["step"] for r in b16]
    assert f32[-1]["train_loss"] < f32[0]["train_loss"] - 0.5  # it does learn
    for a, b in zip(f32, b16):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"], (a, b)
    for a, b in zip([r for r in f32 if r["val_loss"]], [r for r in b16 if r["val_loss"]]):
        assert abs(a["val_loss"] - b["val_loss"]) < 0.05 * a["val_loss"]


def test_mfu_is_measured_only_when_asked_and_is_tokens_times_flops_over_peak(tiny_checkpoint, text_data, tmp_path,
                                                                            monkeypatch):
    import lora_gpt2.training.loop as loop
    from lora_gpt2.training.flops import lora_training_flops_per_token

    calls = []
    monkeypatch.setattr(loop, "measure_matmul_flops", lambda device, dtype: calls.append(dtype) or 2e9)
    plain = train(train_config(tiny_checkpoint[0], text_data, tmp_path / "a", max_steps=2))
    assert plain.mfu is None and calls == []  # no 2048^3 benchmark at the end of every run
    asked = train(train_config(tiny_checkpoint[0], text_data, tmp_path / "b", max_steps=2), measure_mfu=True)
    assert calls == [torch.float32]
    model = load_pretrained(tiny_checkpoint[0], targets=())
    per_token = lora_training_flops_per_token(model.config, 32)
    assert asked.mfu == pytest.approx(asked.tokens_per_s * per_token / 2e9, rel=1e-12)


def test_flops_per_token_of_gpt2_small_by_hand():
    from lora_gpt2.config import ModelConfig
    from lora_gpt2.training.flops import lora_training_flops_per_token

    d, layers, vocab, t = 768, 12, 50257, 256
    matmul_weights = layers * (d * 3 * d + d * d + d * 4 * d + 4 * d * d) + d * vocab  # qkv, proj, fc, proj, head
    assert matmul_weights == 123_532_032
    expected = 2 * matmul_weights + 2 * matmul_weights + 2 * 2 * layers * t * d * 2  # fwd, input grads, attention
    assert lora_training_flops_per_token(ModelConfig(), t) == expected == 513_002_496


def test_lr_factor_at_its_ends():
    from lora_gpt2.training import lr_factor

    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)  # first warmup step: 1/warmup
    assert lr_factor(9, 10, 100, 0.1) == 1.0  # warmup ends at the peak
    assert lr_factor(10, 10, 100, 0.1) == 1.0  # cosine starts at the peak
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)  # the floor at the end
    assert lr_factor(500, 10, 100, 0.1) == pytest.approx(0.1)  # and after it
    assert lr_factor(0, 0, 1, 0.0) == 1.0  # no warmup, one step


def test_grad_norm_is_the_norm_of_all_adapter_gradients_before_clipping(tiny_checkpoint, text_data, tmp_path):
    cfg = train_config(tiny_checkpoint[0], text_data, tmp_path / "run", targets=("attn", "ffn"), grad_clip=1e-3)
    with built_trainer(cfg) as trainer:
        run = trainer.run_
        batch = run.batches.get(0, 0)
        loss = run.model(batch.x, targets=batch.y, reduction="sum") / run.batches.counted(0)
        params = [p for p in run.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        expected = torch.cat([g.flatten() for g in grads]).norm().item()
        stats = trainer.train_step()
    assert expected > 1e-2  # far above the clip: the value is the norm before clipping
    assert stats.grad_norm == pytest.approx(expected, rel=1e-5)
    assert stats.loss == pytest.approx(loss.item(), rel=1e-6)


def test_grad_norm_reaches_metrics_and_the_terminal_line(tiny_checkpoint, text_data, tmp_path, cli):
    out = tmp_path / "run"
    code, _, stderr = cli("train", "--model", tiny_checkpoint[0], "--data", str(text_data), "--out", str(out),
                          "--targets", "attn", "--rank", "4", "--block-size", "32", "--batch-size", "2",
                          "--max-steps", "4", "--eval-interval", "4", "--eval-batches", "1", "--log-interval", "2",
                          "--device", "cpu", "--dtype", "float32")
    assert code == 0
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["grad_norm"] > 0 for r in rows)
    lines = [line for line in stderr.splitlines() if line.startswith("step 2 |")]
    assert lines and f"grad norm {rows[0]['grad_norm']:.3g}" in lines[0]


def test_lora_plus_clips_both_groups(tiny_checkpoint, text_data, tmp_path):
    """With LoRA+ the lora_b tensors are a second optimiser group; clipping once covered only the
    first (lora_a, whose gradient is zero at step 1), so lora_b took unclipped steps."""
    def first_update(clip):
        cfg = train_config(tiny_checkpoint[0], text_data, tmp_path / f"clip-{clip}", targets=("attn",),
                           lora_plus_ratio=4.0, grad_clip=clip, warmup_steps=0)
        with built_trainer(cfg) as trainer:
            before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_b" in k}
            trainer.train_step()
            after = dict(trainer.model.named_parameters())
            return max((after[k] - before[k]).abs().max().item() for k in before)

    unclipped, clipped = first_update(0.0), first_update(1e-12)
    assert unclipped > 1e-3  # Adam's first step: about lr x ratio
    assert clipped < unclipped / 1000
