"""Adapters in use: merge into a plain HF model, PEFT export/import, training agreement with PEFT."""

import json

import pytest
import torch
import torch.nn.functional as F

from lora_gpt2.checkpoints import adapter_dir as checkpoint
from lora_gpt2 import load_pretrained
from lora_gpt2.checkpoints.reading import load_with_adapter
from lora_gpt2.errors import CheckpointError
from lora_gpt2.adapters.lora import lora_parameters
from lora_gpt2.checkpoints.merged import write_merged
from lora_gpt2.checkpoints.peft import export_peft
from lora_gpt2.adapters import lora
from lora_gpt2.config import LoRAConfig, ModelConfig
from lora_gpt2.model.gpt2 import GPT2

from helpers import five_steps_agree, ids, make_hf_model


def randomized(path, targets, seed=0, r=4, alpha=8.0):
    """Our model with non-zero LoRA tensors, so every update matters."""
    model = load_pretrained(path, targets=targets, r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("targets, tied", [(("attn", "ffn"), True), (("all",), False), (("lm_head",), False),
                                           (("token_embedding",), False)])
def test_merged_model_loads_in_transformers_with_the_same_logits(tiny_checkpoint, tmp_path, targets, tied):
    from transformers import GPT2LMHeadModel

    model = randomized(tiny_checkpoint[0], targets)
    with torch.no_grad():
        expected = model(ids())
    write_merged(model, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, expected, rtol=0, atol=1e-4)
    # and lora-gpt2 itself reads the merged folder back as a plain base model
    again = load_pretrained(str(tmp_path / "merged"), targets=())
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), expected, rtol=0, atol=1e-4)


def save_ours(model, directory):
    checkpoint.save_checkpoint(directory, model, None, step=0)
    return directory


@pytest.mark.parametrize("targets", [("qkv_projection",), ("all",)])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny_checkpoint, tmp_path, targets):
    from peft import PeftModel
    from safetensors.torch import load_file

    path, hf = tiny_checkpoint
    model = randomized(path, targets)
    adapter = save_ours(model, tmp_path / "adapter")
    export_peft(load_file(adapter / "adapter.safetensors"), model.lora_config, model.config.n_layer, path,
                tmp_path / "peft")
    base = make_hf_model()  # a fresh copy: PEFT wraps modules in place
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, model(ids()), rtol=0, atol=1e-4)


def test_peft_adapter_imports_with_the_same_logits(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, _ = tiny_checkpoint
    base = make_hf_model()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_attn", "mlp.c_fc", "wpe"],
                        fan_in_fan_out=True, lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    ours, adapter = load_with_adapter(str(tmp_path / "peft"), model=path)
    assert adapter.kind == "peft" and ours.lora_config.targets == ("position_embedding", "qkv_projection", "linear_in")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), peft_model(ids()).logits, rtol=0, atol=1e-4)


def test_peft_features_we_do_not_support_are_refused_by_name(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    model = randomized(path, ("qkv_projection",))
    from safetensors.torch import load_file

    adapter = save_ours(model, tmp_path / "adapter")
    export_peft(load_file(adapter / "adapter.safetensors"), model.lora_config, 2, path, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg.update(rank_pattern={"c_attn": 8}, some_future_field=123)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"rank_pattern=\{'c_attn': 8\} is not supported"):
        load_with_adapter(str(tmp_path / "peft"), model=path)
    cfg["rank_pattern"] = {}  # unknown fields alone are tolerated
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    load_with_adapter(str(tmp_path / "peft"), model=path)


def test_five_adamw_steps_agree_with_transformers_plus_peft(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    path, _ = tiny_checkpoint
    targets = ("qkv_projection", "output_projection", "linear_in", "linear_out")
    ours = randomized(path, targets, seed=5)
    adapter = save_ours(ours, tmp_path / "adapter")
    export_peft(load_file(adapter / "adapter.safetensors"), ours.lora_config, 2, path, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(make_hf_model(), tmp_path / "peft", is_trainable=True).eval()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    five_steps_agree(ours, theirs, opt_ours, opt_theirs)


def test_adapter_from_another_base_is_refused_unless_forced(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    model = randomized(path, ("qkv_projection",))
    adapter = save_ours(model, tmp_path / "adapter")
    other = tmp_path / "other"
    make_hf_model(seed=9).save_pretrained(other)
    with pytest.raises(CheckpointError, match=rf"trained on base '.*' \(fingerprint {model.fingerprint}\), "
                                              rf"but '.*other' has fingerprint"):
        load_with_adapter(str(adapter), model=str(other))
    forced, _ = load_with_adapter(str(adapter), model=str(other), force=True)
    assert forced.fingerprint != model.fingerprint


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter.safetensors").unlink(), "has adapter.json but no adapter.safetensors"),
    (lambda d: (d / "adapter.json").unlink(), "holds no adapter"),
    (lambda d: (d / "adapter.safetensors").write_bytes((d / "adapter.safetensors").read_bytes()[:100]),
     "does not match the sha256 in adapter.json"),
    (lambda d: (d / "adapter.json").write_text("{"), "is not valid JSON"),
    (lambda d: (d / "adapter.json").write_text(
        (d / "adapter.json").read_text().replace('"format_version": 1', '"format_version": 7')),
     "has format version 7, newer than this lora-gpt2"),
])
def test_damaged_adapters_are_clear_errors(tiny_checkpoint, tmp_path, damage, message):
    path, _ = tiny_checkpoint
    adapter = save_ours(randomized(path, ("qkv_projection",)), tmp_path / "adapter")
    damage(adapter)
    with pytest.raises(CheckpointError, match=message):
        load_with_adapter(str(adapter), model=path)


def test_tensors_missing_extra_or_misshapen_are_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = tiny_checkpoint
    adapter = save_ours(randomized(path, ("qkv_projection",)), tmp_path / "adapter")
    tensors = load_file(adapter / "adapter.safetensors")
    meta = json.loads((adapter / "adapter.json").read_text())
    meta.pop("adapter_sha256")  # hand-edited adapters carry no checksum
    (adapter / "adapter.json").write_text(json.dumps(meta))
    says = r"adapter.json says r=4, targets qkv_projection, variant lora, but "
    cases = [
        ({k: v for k, v in tensors.items() if k != "blocks.1.attn.qkv_projection.lora_b"},
         says + "it has no tensor blocks.1.attn.qkv_projection.lora_b$"),
        ({**tensors, "blocks.0.ffn.linear_in.lora_a": torch.zeros(4, 32)},
         says + "it holds tensor blocks.0.ffn.linear_in.lora_a, which that has no place for$"),
        ({**tensors, "blocks.0.attn.qkv_projection.lora_a": torch.zeros(4, 33)},
         says + r"tensor blocks.0.attn.qkv_projection.lora_a is \(4, 33\) where that needs \(4, 32\)$"),
    ]
    for content, message in cases:
        save_file(content, adapter / "adapter.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_with_adapter(str(adapter), model=path)


class ScaledOnly(lora.AdapterLayer, lora.FrozenLinear):
    """A made-up variant with a parameter of another name: out = linear(x, W * (1 + gain)).

    It declares itself through the interface only; nothing else in lora-gpt2 knows it.
    """

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out, bias=False)
        self.gain = torch.nn.Parameter(torch.zeros(n_out, 1))
        self.merged, self.active = False, True

    def adapter_params(self):
        return {"gain": self.gain}

    def reset_adapter_parameters(self):
        torch.nn.init.zeros_(self.gain)

    def merge(self):
        if not self.merged:
            with torch.no_grad():
                self.weight.mul_(1 + self.gain)
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.weight.div_(1 + self.gain)
            self.merged = False

    def forward(self, x):
        if self.merged or not self.active:
            return F.linear(x, self.weight)
        return F.linear(x, self.weight * (1 + self.gain))


def test_a_new_variant_is_trained_saved_and_computed_right_through_the_interface_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=False)
    model = GPT2(cfg, LoRAConfig(targets=()))
    model.lm_head = ScaledOnly(8, 40)
    lora.mark_only_lora_trainable(model)
    assert set(lora.lora_parameters(model)) == {"lm_head.gain"}  # freezing, counting and saving see it
    assert lora.count_parameters(model)[0] == 40
    with torch.no_grad():
        model.lm_head.gain.normal_(std=0.5)
    x, y = torch.randint(0, 40, (2, 10)), torch.randint(0, 40, (2, 10))
    # the fused loss cannot know this layer's maths: it must use its forward, not a wrong formula
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    fused = model(x, targets=y)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    fused.backward()
    assert model.lm_head.gain.grad is not None and model.lm_head.gain.grad.abs().sum() > 0
    before = model(x)
    model.merge()
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_peft_export_refuses_a_tensor_it_has_no_name_for(tmp_path):
    from lora_gpt2.errors import CheckpointError
    from lora_gpt2.checkpoints.peft import export_peft

    tensors = {"blocks.0.attn.qkv_projection.gain": torch.ones(96)}
    with pytest.raises(CheckpointError, match="'blocks.0.attn.qkv_projection.gain' has no PEFT equivalent"):
        export_peft(tensors, LoRAConfig(), 2, "gpt2", tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_config.json").exists()
