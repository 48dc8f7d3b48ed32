"""LoRA variants behind the adapter seam: rsLoRA, LoRA+ and adapters on some blocks only, each
equal to PEFT's, exported and imported, and refused by name when asked wrongly."""

import json

import pytest
import torch

from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2 import load_pretrained
from lora_gpt2.checkpoints.reading import load_with_adapter
from lora_gpt2.config import LoRAConfig
from lora_gpt2.adapters.lora import fast_parameters, lora_parameters
from lora_gpt2.checkpoints.peft import export_peft
from lora_gpt2.training.config import OptimSettings
from lora_gpt2.training.optim import build_optimizer

from helpers import five_steps_agree, ids, make_hf_model, randomize_adapters, save_hf_model

ATTN_FFN = ("qkv_projection", "output_projection", "linear_in", "linear_out")


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    """A tiny GPT-2 with 4 blocks, so that 'some blocks' means something."""
    return save_hf_model(make_hf_model(seed=4, n_layer=4), tmp_path_factory.mktemp("four-blocks"))


def ours_with(path, lora, seed=0):
    return randomize_adapters(load_pretrained(path, lora=lora), seed=seed, scale=0.05).eval()


def as_peft(model, path, tmp_path, n_layer):
    from peft import PeftModel
    from safetensors.torch import load_file

    checkpoint.save_checkpoint(tmp_path / "adapter", model, None, step=0)
    export_peft(load_file(tmp_path / "adapter" / "adapter.safetensors"), model.lora_config, n_layer, path,
                tmp_path / "peft")
    from transformers import GPT2LMHeadModel

    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(path), tmp_path / "peft",
                                     is_trainable=True).eval()


def test_rslora_scales_by_alpha_over_sqrt_r():
    assert LoRAConfig(r=16, alpha=8.0, rslora=True).scaling == 8.0 / 4.0
    assert LoRAConfig(r=16, alpha=8.0).scaling == 0.5
    from lora_gpt2.adapters import lora

    layer = lora.Linear(8, 8, True, r=4, alpha=2.0, rslora=True)
    assert layer.scaling == 1.0


def agrees_with_peft_and_reads_back(ours, theirs, base, tmp_path):
    """Logits within 1e-5, equal trainable counts, five AdamW steps within 1e-4; then the PEFT
    folder (tmp_path / "peft") reads back into lora-gpt2 with the same logits. Its adapter info."""
    with torch.no_grad():
        before = ours(ids())
        torch.testing.assert_close(before, theirs(ids()).logits, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    five_steps_agree(ours, theirs, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3),
                     torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3))
    again, info = load_with_adapter(str(tmp_path / "peft"), model=base)
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), before, rtol=0, atol=1e-5)
    return info


@pytest.mark.parametrize("lora", [
    LoRAConfig(targets=ATTN_FFN, r=4, alpha=8.0, rslora=True),
    LoRAConfig(targets=ATTN_FFN, r=4, alpha=8.0, layers="2-3"),
    LoRAConfig(targets=("qkv_projection", "lm_head"), r=4, alpha=8.0, layers="1", rslora=True),
    LoRAConfig(targets=("qkv_projection", "token_embedding"), r=4, alpha=8.0, layers="0,2"),
], ids=["rslora", "layers-2-3", "last-block-rslora-lm-head", "blocks-0-2-and-embedding"])
def test_variant_equals_peft_in_logits_and_five_adamw_steps(four_blocks, tmp_path, lora):
    ours = ours_with(four_blocks, lora, seed=7)
    theirs = as_peft(ours, four_blocks, tmp_path, 4)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is lora.rslora
    assert config["layers_to_transform"] == (None if lora.layers is None else list(lora.blocks(4)))
    info = agrees_with_peft_and_reads_back(ours, theirs, four_blocks, tmp_path)
    assert (info.lora.rslora, info.lora.blocks(4)) == (lora.rslora, lora.blocks(4))


def test_lora_plus_equals_peft_create_loraplus_optimizer(four_blocks, tmp_path):
    from peft.optimizers import create_loraplus_optimizer

    lora = LoRAConfig(targets=ATTN_FFN, r=4, alpha=8.0)
    ours = ours_with(four_blocks, lora, seed=11)
    theirs = as_peft(ours, four_blocks, tmp_path, 4)
    settings = OptimSettings(lr=1e-3, lora_plus_ratio=16.0, weight_decay=0.0)
    params = list(lora_parameters(ours).values())
    opt_ours = build_optimizer(params, settings, fast_parameters(ours))
    assert [(len(g["params"]), g["lr"]) for g in opt_ours.param_groups] == [(16, 1e-3), (16, 16e-3)]
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    five_steps_agree(ours, theirs, opt_ours, opt_theirs)


def test_lora_plus_survives_resume_with_its_groups(tiny_checkpoint, text_data, tmp_path):
    from safetensors.torch import load_file

    from lora_gpt2.training import train

    from helpers import train_config

    kwargs = dict(targets=("attn", "token_embedding"), max_steps=6, eval_interval=3, lora_plus_ratio=8.0)
    train(train_config(tiny_checkpoint[0], text_data, tmp_path / "whole", **kwargs))
    train(train_config(tiny_checkpoint[0], text_data, tmp_path / "split", **kwargs), stop_after=3)
    train(train_config(tiny_checkpoint[0], text_data, tmp_path / "split", **kwargs), resume=True)
    a = load_file(tmp_path / "whole" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "last" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = checkpoint.load_state(tmp_path / "split" / "last")
    assert [g["lr_scale"] for g in state["optimizer"]["param_groups"]] == [1.0, 8.0]


def test_backward_stops_at_the_lowest_adapted_block(four_blocks, monkeypatch):
    model = load_pretrained(four_blocks, lora=LoRAConfig(targets=ATTN_FFN, r=4, layers="1"))  # the last block
    assert model.first_trained_block == 3
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out.requires_grad)))
    x = ids()
    loss = model(x, targets=ids(seed=4))
    assert seen == [(0, False), (1, False), (2, False), (3, True)]  # no graph below block 3
    grads = torch.autograd.grad(loss, list(lora_parameters(model).values()))
    # the same gradients as a full backward (blocks 0-2 have nothing to learn)
    monkeypatch.setattr(type(model), "first_trained_block", property(lambda self: 0))
    full = torch.autograd.grad(model(x, targets=ids(seed=4)), list(lora_parameters(model).values()))
    monkeypatch.undo()
    for a, b in zip(grads, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_pretrained(four_blocks, lora=LoRAConfig(targets=("lm_head",))).first_trained_block == 4
    assert load_pretrained(four_blocks, lora=LoRAConfig(targets=("qkv_projection", "position_embedding"),
                                                        layers="3")).first_trained_block == 0


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "layers must be N (the last N blocks, N >= 1), A-B with A <= B, or a list A,B,C of block "
                        "numbers from 0; got '0'"),
    (["--layers", "9-3"], "got '9-3'"),
    (["--layers", "x"], "got 'x'"),
    (["--lora-plus-ratio", "0"], "lora_plus_ratio must be > 0, got 0.0"),
    (["--lora-plus-ratio", "-2"], "lora_plus_ratio must be > 0, got -2.0"),
    (["--variant", "vera"], "unknown LoRA variant 'vera'; choose one of lora, dora"),
    (["--init", "pissa_niter_0"], "unknown LoRA init 'pissa_niter_0'; choose one of default, pissa, olora or "
                                  "pissa_niter_N"),
])
def test_bad_variant_values_are_one_line(args, message, cli):
    code, _, err = cli("train", *args, "--print-config")
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err


def test_layers_beyond_the_model_are_named(tiny_checkpoint, text_data, tmp_path, cli):
    for layers, message in (("3", "layers '3' asks for the last 3 blocks of a 2-block model"),
                            ("1-5", "layers '1-5' names block 5, but the model's blocks are 0-1")):
        code, _, err = cli("train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", tmp_path / "r",
                           "--layers", layers, "--device", "cpu")
        assert code == 1 and err.strip().splitlines()[-1].endswith(message), err
        assert not (tmp_path / "r").exists()


def test_resuming_with_another_variant_is_refused(tiny_checkpoint, text_data, tmp_path, cli):
    args = ["train", "--model", tiny_checkpoint[0], "--data", text_data, "--out", tmp_path / "r", "--max-steps", "2",
            "--block-size", "16", "--batch-size", "2", "--device", "cpu", "--layers", "1"]
    assert cli(*args)[0] == 0
    meta = json.loads((tmp_path / "r" / "last" / "adapter.json").read_text())
    assert meta["lora"]["layers"] == "1" and meta["lora"]["rslora"] is False
    for extra, named in ((["--rslora"], "rslora True: the run was trained with rslora False"),
                         (["--layers", "0-1"], "layers 0-1: the run was trained with layers 1"),
                         (["--lora-plus-ratio", "4"], "lora_plus_ratio 4.0: the run was trained with lora_plus_ratio None"),
                         (["--variant", "dora"], "variant dora: the run was trained with variant lora"),
                         (["--init", "olora"], "init olora: the run was trained with init default")):
        code, _, err = cli(*args, "--resume", "--max-steps", "3", *extra)
        assert code == 1 and named in err, err


def test_what_0_2_wrote_as_dora_reads_as_the_dora_variant(four_blocks, tmp_path, cli):
    """0.2 said `"dora": true` (adapter.json, run config, TOML) and `--dora`; each still means DoRA."""
    ours = ours_with(four_blocks, LoRAConfig(targets=("qkv_projection",), r=4, variant="dora"), seed=3)
    checkpoint.save_checkpoint(tmp_path / "adapter", ours, None, step=1)
    meta_path = tmp_path / "adapter" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    del meta["lora"]["variant"], meta["lora"]["init"]
    meta["lora"]["dora"] = True
    meta_path.write_text(json.dumps(meta))
    again, info = load_with_adapter(str(tmp_path / "adapter"))
    assert info.lora.variant == "dora"
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), ours(ids()), rtol=0, atol=0)
    (tmp_path / "old.toml").write_text("[model]\ndora = true\n")
    for args in (["--config", tmp_path / "old.toml"], ["--dora"]):
        code, out, err = cli("train", *args, "--print-config")
        assert code == 0 and 'variant = "dora"' in out and "dora = " not in out, err


def test_what_peft_can_do_and_we_cannot_read_is_still_refused(four_blocks, tmp_path):
    from lora_gpt2.errors import CheckpointError

    as_peft(ours_with(four_blocks, LoRAConfig(targets=ATTN_FFN, r=4)), four_blocks, tmp_path, 4)
    config_path = tmp_path / "peft" / "adapter_config.json"
    for field, value in (("rank_pattern", {"c_attn": 8}), ("alpha_pattern", {"c_attn": 2.0}),
                         ("layers_to_transform", ["x"])):
        config = json.loads(config_path.read_text())
        config[field] = value
        config_path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=rf"{field}"):
            load_with_adapter(str(tmp_path / "peft"), model=four_blocks)
        config_path.write_text(json.dumps({**config, field: None}))


@pytest.mark.parametrize("targets", [ATTN_FFN, ("token_embedding", "qkv_projection"), ("lm_head",)],
                         ids=["attn-ffn", "embedding", "lm-head"])
def test_dora_equals_peft_in_logits_and_five_adamw_steps(four_blocks, tmp_path, targets):
    lora = LoRAConfig(targets=targets, r=4, alpha=8.0, variant="dora")
    fresh = load_pretrained(four_blocks, lora=lora)
    with torch.no_grad():  # a fresh DoRA layer equals the frozen one (B = 0, magnitude = ||W||)
        torch.testing.assert_close(fresh(ids()), load_pretrained(four_blocks, targets=())(ids()), rtol=0, atol=1e-5)
    ours = ours_with(four_blocks, lora, seed=13)
    with torch.no_grad():  # magnitudes near ||W||, as training would leave them
        for name, p in lora_parameters(ours).items():
            if name.endswith("magnitude"):
                layer = ours.get_submodule(name.rsplit(".", 1)[0])
                p.copy_(layer.norm() * (1 + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))))
    theirs = as_peft(ours, four_blocks, tmp_path, 4)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    assert agrees_with_peft_and_reads_back(ours, theirs, four_blocks, tmp_path).lora.variant == "dora"


def test_merged_dora_is_a_plain_transformers_model_with_the_same_logits(four_blocks, tmp_path):
    from transformers import GPT2LMHeadModel

    from lora_gpt2.checkpoints.merged import write_merged

    ours = ours_with(four_blocks, LoRAConfig(targets=ATTN_FFN + ("token_embedding",), r=4, alpha=8.0, variant="dora"),
                     seed=17)
    with torch.no_grad():
        expected = ours(ids())
        ours.merge()
        torch.testing.assert_close(ours(ids()), expected, rtol=0, atol=1e-4)
        ours.unmerge()
        torch.testing.assert_close(ours(ids()), expected, rtol=0, atol=1e-4)
    write_merged(ours, tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_variants_together_equal_peft_at_gpt2_small_shape(tmp_path):
    """DoRA + rsLoRA on the last 4 of 12 blocks (attention and MLP) plus LoRA+, at 124M parameters."""
    from peft.optimizers import create_loraplus_optimizer

    path = save_hf_model(make_hf_model(seed=2, n_layer=12, n_head=12, n_embd=768, n_positions=1024),
                         tmp_path / "gpt2-small")
    lora = LoRAConfig(targets=ATTN_FFN, r=8, alpha=16.0, variant="dora", rslora=True, layers="4")
    ours = ours_with(path, lora, seed=19)
    theirs = as_peft(ours, path, tmp_path, 12)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["use_dora"], config["use_rslora"], config["layers_to_transform"]) == (True, True, [8, 9, 10, 11])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), theirs(ids()).logits, rtol=0, atol=1e-5)
    settings = OptimSettings(lr=1e-3, lora_plus_ratio=16.0, weight_decay=0.0)
    five_steps_agree(ours, theirs, build_optimizer(list(lora_parameters(ours).values()), settings,
                                                   fast_parameters(ours)),
                     create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0))
