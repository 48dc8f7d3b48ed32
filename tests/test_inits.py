"""Residual initialisations (PiSSA, OLoRA): equal to PEFT's after the start and after five AdamW
steps, saved as a plain rank-2r LoRA of the original weights (as PEFT's conversion saves them),
resumed bit for bit, and refused by name where they cannot apply."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from lora_gpt2 import load_pretrained
from lora_gpt2.adapters import variants
from lora_gpt2.adapters.lora import adapter_layers
from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2.checkpoints.peft import export_peft
from lora_gpt2.checkpoints.reading import load_with_adapter
from lora_gpt2.config import LoRAConfig
from lora_gpt2.training import train

from helpers import cli_command, five_steps_agree, ids, make_hf_model, save_hf_model, subprocess_env, train_config

ATTN_FFN = ("qkv_projection", "output_projection", "linear_in", "linear_out")
PEFT_NAMES = {ATTN_FFN: ["c_attn", "c_proj", "c_fc"], ("lm_head",): ["lm_head"]}


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny GPT-2 whose lm_head has its own weight, so that a residual init may change it."""
    return save_hf_model(make_hf_model(seed=5, tie_word_embeddings=False), tmp_path_factory.mktemp("untied"))


def peft_model(path, targets, init, r=4, alpha=8.0):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=PEFT_NAMES[targets],
                        fan_in_fan_out=targets != ("lm_head",), init_lora_weights=init)
    return get_peft_model(GPT2LMHeadModel.from_pretrained(path), config)


def base_logits(path):
    with torch.no_grad():
        return load_pretrained(path, lora=LoRAConfig(targets=())).eval()(ids())


@pytest.mark.parametrize("init,targets", [("pissa", ATTN_FFN), ("pissa", ("lm_head",)), ("olora", ("lm_head",))],
                         ids=["pissa-attn-ffn", "pissa-lm-head", "olora-lm-head"])
def test_residual_init_equals_peft_at_the_start_after_five_steps_and_once_converted(untied, tmp_path, init, targets):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    ours = load_pretrained(untied, lora=LoRAConfig(targets=targets, r=4, alpha=8.0, init=init))
    theirs = peft_model(untied, targets, init)
    layer = next(iter(adapter_layers(ours).values()))
    peft_a = next(p for n, p in theirs.named_parameters() if "lora_A" in n)
    torch.testing.assert_close(layer.lora_a, peft_a, rtol=0, atol=1e-5)  # the same factors, the same signs
    assert torch.linalg.matrix_rank(layer.lora_b @ layer.lora_a).item() == 4
    with torch.no_grad():  # the start changes nothing: residual + s·B0A0 is the weight
        torch.testing.assert_close(ours.eval()(ids()), base_logits(untied), rtol=0, atol=1e-4)
        torch.testing.assert_close(ours(ids()), theirs.eval()(ids()).logits, rtol=0, atol=1e-4)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: keep the start to convert later
    theirs.save_pretrained(tmp_path / "peft-start")
    theirs.peft_config["default"].init_lora_weights = init
    five_steps_agree(ours, theirs, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3),
                     torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3))
    with torch.no_grad():
        trained = ours.eval()(ids())
        torch.testing.assert_close(trained, theirs.eval()(ids()).logits, rtol=0, atol=1e-4)

    checkpoint.save_checkpoint(tmp_path / "adapter", ours, None, step=5)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())["lora"]
    assert (meta["r"], meta["alpha"], meta["init"]) == (8, 16.0, "default")  # rank 2r, the same scaling
    again, _ = load_with_adapter(str(tmp_path / "adapter"), model=untied)  # the original weights
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), trained, rtol=0, atol=1e-4)

    # PEFT on the original weights: our converted adapter, exported, and PEFT's own conversion
    export_peft(load_file(tmp_path / "adapter" / "adapter.safetensors"), again.lora_config, 2, untied,
                tmp_path / "ours-peft")
    theirs.save_pretrained(tmp_path / "peft-converted",
                           path_initial_model_for_weight_conversion=str(tmp_path / "peft-start"))
    converted = json.loads((tmp_path / "peft-converted" / "adapter_config.json").read_text())
    assert (converted["r"], converted["lora_alpha"]) == (8, 16.0)
    for folder in ("ours-peft", "peft-converted"):
        loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(untied), tmp_path / folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids()).logits, trained, rtol=0, atol=1e-4)


def test_olora_on_conv1d_weights_factors_the_weight_the_layer_computes_with(untied):
    """PEFT 0.21's OLoRA factors the stored (in, out) Conv1D matrix, which fails for c_attn; ours
    factors the (out, in) weight, checked against a plain QR."""
    from transformers import GPT2LMHeadModel

    ours = load_pretrained(untied, lora=LoRAConfig(targets=("qkv_projection",), r=4, alpha=8.0, init="olora"))
    hf = GPT2LMHeadModel.from_pretrained(untied)
    original = hf.transformer.h[0].attn.c_attn.weight.detach().T  # (out, in)
    q, upper = torch.linalg.qr(original)
    layer = ours.blocks[0].attn.qkv_projection
    torch.testing.assert_close(layer.lora_a, upper[:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_b, q[:, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight, original - 2.0 * q[:, :4] @ upper[:4], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids()), base_logits(untied), rtol=0, atol=1e-4)


def test_pissa_by_randomised_svd_is_near_the_best_rank_r_part(untied):
    ours = load_pretrained(untied, lora=LoRAConfig(targets=("linear_in",), r=4, alpha=4.0, init="pissa_niter_8"))
    full = load_pretrained(untied, lora=LoRAConfig(targets=("linear_in",), r=4, alpha=4.0, init="pissa"))
    fast, best = ours.blocks[1].ffn.linear_in, full.blocks[1].ffn.linear_in
    original = best.weight + best.delta_weight()
    error = torch.linalg.norm(original - fast.delta_weight()) / torch.linalg.norm(original - best.delta_weight())
    assert 1.0 - 1e-4 <= error.item() < 1.02  # within 2% of the SVD's optimum (Eckart-Young)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids()), base_logits(untied), rtol=0, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_residual_run_resumes_bit_identically_and_its_readers_need_not_know(untied, text_data, tmp_path, init):
    kwargs = dict(targets=("attn", "lm_head"), init=init, max_steps=8, eval_interval=3, log_interval=1, dropout=0.1)
    train(train_config(untied, text_data, tmp_path / "whole", **kwargs))
    first = train(train_config(untied, text_data, tmp_path / "split", **kwargs), stop_after=4)
    assert first.interrupted and first.step == 4
    train(train_config(untied, text_data, tmp_path / "split", **kwargs), resume=True)
    a = load_file(tmp_path / "whole" / "last" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "last" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["lm_head.lora_a"].shape == (8, 32)  # rank 2r = 8 on the original weights
    # eval, a reader that knows nothing of the init, reproduces the run's best val loss
    best = json.loads((tmp_path / "whole" / "best" / "adapter.json").read_text())
    done = subprocess.run(cli_command("eval", "--adapter", tmp_path / "whole", "--json"), capture_output=True,
                          text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["adapter"]["loss"] == pytest.approx(best["val_loss"], abs=1e-5)


@pytest.mark.parametrize("lora,message", [
    (LoRAConfig(targets=("attn",), init="pissa", variant="dora"),
     "init pissa cannot start a dora adapter: a dora adapter has no plain-LoRA form to save it as"),
    (LoRAConfig(targets=("attn", "token_embedding"), init="olora"),
     "init olora decomposes linear weights only (as PEFT's), but the targets include the embedding token_embedding"),
    (LoRAConfig(targets=("attn",), init="svd"), "unknown LoRA init 'svd'; choose one of default, pissa, olora or "
                                                 "pissa_niter_N"),
    (LoRAConfig(targets=("attn",), variant="vera"), "unknown LoRA variant 'vera'; choose one of lora, dora"),
])
def test_what_the_table_refuses(lora, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        variants.check(lora)


def test_a_residual_init_refuses_a_tied_lm_head_and_a_rank_it_cannot_save(tiny_checkpoint):
    path, _ = tiny_checkpoint  # lm_head tied to the token embedding
    with pytest.raises(ValueError, match="init pissa would change lm_head's frozen weight, which this model ties "
                                         "to token_embedding"):
        load_pretrained(path, lora=LoRAConfig(targets=("lm_head",), init="pissa"))
    with pytest.raises(ValueError, match="rank r=40 is more than output_projection can use: its weight is 32 x 32"):
        load_pretrained(path, lora=LoRAConfig(targets=("output_projection",), r=20, init="pissa"))


def test_the_cli_names_a_bad_init(tiny_checkpoint, text_data, tmp_path):
    path, _ = tiny_checkpoint
    done = subprocess.run(cli_command("train", "--model", path, "--data", text_data, "--out", tmp_path / "run",
                                      "--init", "pissa", "--variant", "dora", "--max-steps", "1"),
                          capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 1 and not (tmp_path / "run").exists()
    assert done.stderr.strip().splitlines() == [
        "lora-gpt2: error: init pissa cannot start a dora adapter: a dora adapter has no plain-LoRA form to save it as; "
        "use --init default"]


def test_a_peft_folder_saved_unconverted_is_refused_by_name(untied, tmp_path):
    theirs = peft_model(untied, ("lm_head",), "pissa")
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(Exception, match="init_lora_weights='pissa': its tensors apply to the residual weights"):
        load_with_adapter(str(tmp_path / "peft"), model=untied)
