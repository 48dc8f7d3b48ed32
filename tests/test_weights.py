"""Loading checkpoints: local, through an offline Hub cache, and every way a checkpoint can be wrong."""

import json
import shutil

import pytest
import torch

from lora_gpt2 import load_pretrained
from lora_gpt2.errors import CheckpointError
from lora_gpt2 import layout
from lora_gpt2.config import LoRAConfig, ModelConfig
from lora_gpt2.model.gpt2 import GPT2

from helpers import make_hf_model


def lay_out_hub_cache(cache, repo_id, checkpoint_dir):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint_dir / name, snapshot / name)
    return snapshot


def copy_checkpoint(src, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{src}/{name}", dst / name)
    return dst


def test_hub_id_loads_from_an_offline_cache(tiny_checkpoint, tmp_path, monkeypatch):
    path, hf = tiny_checkpoint
    lay_out_hub_cache(tmp_path, "openai-community/gpt2", __import__("pathlib").Path(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = load_pretrained("openai-community/gpt2", targets=("attn",))
    idx = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_hub_id_missing_offline_says_how_to_pass_a_path(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"model 'gpt2' is not in the Hugging Face cache.*--model PATH"):
        load_pretrained("gpt2")


@pytest.mark.parametrize("name, message", [
    ("./no/such/dir", "model directory './no/such/dir' does not exist"),
    ("", "no model given"),
])
def test_bad_model_names(name, message):
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(name)


def test_directory_without_weights(tiny_checkpoint, tmp_path):
    shutil.copy(f"{tiny_checkpoint[0]}/config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"has no weights \(looked for model.safetensors"):
        load_pretrained(str(tmp_path))


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(str(tmp_path))


def test_non_gpt2_config_is_refused(tiny_checkpoint, tmp_path):
    d = copy_checkpoint(tiny_checkpoint[0], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"is not a GPT-2 config \(model_type 'llama'"):
        load_pretrained(str(d))


def test_truncated_safetensors_is_a_clear_error(tiny_checkpoint, tmp_path):
    d = copy_checkpoint(tiny_checkpoint[0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(str(d))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    hf = make_hf_model(vocab_size=100)
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    missing = dict(state)
    del missing["transformer.h.1.ln_2.bias"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'h.1.ln_2.bias'"):
        load_pretrained(str(tmp_path))
    wrong = dict(state)
    wrong["transformer.h.0.attn.c_attn.weight"] = torch.zeros(96, 32)
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'h.0.attn.c_attn.weight' has shape \(96, 32\), expected \(32, 96\)"):
        load_pretrained(str(tmp_path))
    extra = dict(state)
    extra["transformer.h.0.attn.q_norm.weight"] = torch.zeros(4)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'h.0.attn.q_norm.weight'"):
        load_pretrained(str(tmp_path))


def test_pytorch_bin_fallback_loads_with_weights_only(tmp_path):
    hf = make_hf_model(seed=3, vocab_size=100)
    hf.config.save_pretrained(tmp_path)
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    model = load_pretrained(str(tmp_path), targets=())
    idx = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_fingerprint_tells_bases_apart_and_is_stable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_hf_model(seed=1, vocab_size=100).save_pretrained(a)
    make_hf_model(seed=2, vocab_size=100).save_pretrained(b)
    fa1 = load_pretrained(str(a)).fingerprint
    fa2 = load_pretrained(str(a), dtype=torch.bfloat16).fingerprint
    fb = load_pretrained(str(b)).fingerprint
    assert fa1 == fa2 and fa1 != fb and len(fa1) == 16


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    hf = make_hf_model(seed=4, vocab_size=100)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model = load_pretrained(str(tmp_path), targets=())
    idx = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_offline_hub_error_from_a_fresh_process_is_one_line(tmp_path):
    """A new process has imported nothing from huggingface_hub yet: the path a user takes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "lora_gpt2", "generate", "hi", "--model", "gpt2"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "lora-gpt2: error: model 'gpt2' is not in the Hugging Face cache and the Hub cannot be reached "
        "(HF_HUB_OFFLINE is set); pass a local directory holding config.json and model.safetensors "
        "with --model PATH"]


def test_every_name_table_is_derived_from_one_layout():
    from lora_gpt2.checkpoints import peft as peft_io, hf as weights
    from lora_gpt2.config import resolve_targets

    # --targets accepts exactly the table's modules, in model order ("all" is every one of them)
    assert resolve_targets("all") == layout.TARGETS == ("token_embedding", "position_embedding", "qkv_projection",
                                                        "output_projection", "linear_in", "linear_out", "lm_head")
    assert resolve_targets("lm_head,attn") == ("qkv_projection", "output_projection", "lm_head")
    peft_names = peft_io.our_to_peft_names(2)
    assert peft_names["blocks.1.ffn.linear_out.lora_b"] == "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"
    assert peft_names["token_embedding.lora_a"] == "base_model.model.transformer.wte.lora_embedding_A"
    assert peft_io.peft_config(LoRAConfig(targets=("all",)), None, 2)["target_modules"] == [
        "wte", "wpe", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"]
    assert weights.is_transposed("h.3.mlp.c_proj.weight") and not weights.is_transposed("h.3.ln_2.weight")


def test_key_map_names_exactly_the_tensors_transformers_saves(tmp_path):
    """Every tensor of a 12-layer HF checkpoint (bar the tied lm_head) is in the map, and nothing else."""
    from lora_gpt2.checkpoints.hf import hf_key_map

    hf = make_hf_model(n_layer=12, n_embd=16, n_head=2, vocab_size=64)
    saved = {k.removeprefix("transformer.") for k in hf.state_dict() if not k.endswith((".attn.bias", ".masked_bias"))}
    saved.discard("lm_head.weight")
    keys = hf_key_map(12)
    assert set(keys.values()) == saved
    ours = {n for n, _ in GPT2(ModelConfig(n_layer=12, n_embd=16, n_head=2, vocab_size=64),
                               LoRAConfig(targets=())).named_parameters()}
    assert set(keys) == ours  # and every frozen tensor of ours has its HF key


def test_the_base_model_is_declared_and_merge_needs_no_second_lookup(tiny_checkpoint, tmp_path, monkeypatch):
    from lora_gpt2.checkpoints import hub
    from lora_gpt2.checkpoints.merged import write_merged

    model = load_pretrained(tiny_checkpoint[0], targets=("qkv_projection",))
    assert model.base.source == tiny_checkpoint[0] and len(model.base.fingerprint) == 16
    assert model.base.hf_config["n_layer"] == 2
    monkeypatch.setattr(hub, "resolve_checkpoint", lambda *a: pytest.fail("merge resolved the base again"))
    write_merged(model, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["n_embd"] == 32
