"""The seams: one adapter interface that every consumer uses, one name table, a loop with
subscribers, a library-level generation session and evaluation, and the footguns removed."""

import json

import pytest
import torch
import torch.nn.functional as F

from lora_gpt2 import layout, load_pretrained
from lora_gpt2.adapters import lora
from lora_gpt2.config import LoRAConfig, ModelConfig
from lora_gpt2.model.gpt2 import GPT2, KVCache

from helpers import ROOT, make_hf_model, train_config


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


@pytest.mark.parametrize("cli_key, lib_key, value, message", [
    ("rank", "r", 0, "rank r must be >= 1, got 0"),
    ("alpha", "alpha", -1.0, "alpha must be > 0, got -1.0"),
    ("dropout", "dropout", 1.5, r"dropout must be in \[0, 1\), got 1.5"),
])
def test_one_validator_for_lora_settings_in_the_library_and_the_cli(cli_key, lib_key, value, message):
    from lora_gpt2.training import config as tc

    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{lib_key: value})
    with pytest.raises(ValueError, match=message):
        tc.resolve(tc.flag_values({cli_key: value}))
    with pytest.raises(ValueError, match=message):
        lora.Linear(4, 4, True, **{"r": 2, lib_key: value})


def test_merge_then_unmerge_leaves_the_tied_pair_tied_and_merged_state_dict_leaves_the_model_alone(tiny_checkpoint):
    from lora_gpt2.checkpoints.merged import merged_state_dict

    model = load_pretrained(tiny_checkpoint[0], targets=("token_embedding", "lm_head"), r=2)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(std=0.1)
    embedding = model.token_embedding.weight.clone()
    state, tied = merged_state_dict(model)
    assert tied is False and "lm_head.weight" in state
    assert model.tied and model.lm_head.weight is model.token_embedding.weight
    assert not any(layer.merged for layer in model.lora_layers().values())
    torch.testing.assert_close(model.token_embedding.weight, embedding, rtol=0, atol=1e-6)


def test_the_base_model_is_declared_and_merge_needs_no_second_lookup(tiny_checkpoint, tmp_path, monkeypatch):
    from lora_gpt2.checkpoints import hub
    from lora_gpt2.checkpoints.merged import write_merged

    model = load_pretrained(tiny_checkpoint[0], targets=("qkv_projection",))
    assert model.base.source == tiny_checkpoint[0] and len(model.base.fingerprint) == 16
    assert model.base.hf_config["n_layer"] == 2
    monkeypatch.setattr(hub, "resolve_checkpoint", lambda *a: pytest.fail("merge resolved the base again"))
    write_merged(model, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["n_embd"] == 32


def test_layer_caches_cannot_be_mixed_up():
    cfg = ModelConfig(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    model = GPT2(cfg)
    cache = KVCache.empty(cfg, 1, torch.float32, "cpu")
    with pytest.raises(TypeError, match=r"its own slice of the cache \(KVCache.layer\(i\)\), got KVCache"):
        model.blocks[1].attn(torch.zeros(1, 3, 8), cache)
    with pytest.raises(TypeError, match="got KVCache"):
        model.blocks[1].attn(torch.zeros(1, 3, 8), [cache.layer(0), cache])
    out = model.blocks[1].attn(torch.zeros(1, 3, 8), cache.layer(1))  # its own slice works
    assert out.shape == (1, 3, 8) and cache.length == 0


def test_generation_past_the_context_equals_fresh_recomputation_of_each_slid_window(small_vocab_checkpoint):
    """Past the context the cache is rebuilt from the last `window_length` tokens: every greedy token
    must equal the argmax of a fresh forward pass over the window the model had at that moment."""
    from lora_gpt2.inference.decoding import window_length
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.session import generate

    model = load_pretrained(small_vocab_checkpoint[0], targets=())  # n_positions 32
    context, keep = 32, window_length(32)
    prompt = [5, 9, 17]
    history = prompt + list(generate(model, prompt, SamplingConfig(max_new_tokens=60, temperature=0)))
    start, checked = 0, 0
    with torch.no_grad():
        for i in range(len(prompt), len(history)):
            if i - start > context:  # the cache was full: it restarted from the last `keep` tokens
                start = i - keep
            fresh = model(torch.tensor([history[start:i]]))[0, -1]
            assert history[i] == int(fresh.argmax()), i
            checked += start > 0
    assert start > 0 and checked >= 20  # several slides happened and were checked


def test_lr_factor_at_its_ends():
    from lora_gpt2.training import lr_factor

    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)  # first warmup step: 1/warmup
    assert lr_factor(9, 10, 100, 0.1) == 1.0  # warmup ends at the peak
    assert lr_factor(10, 10, 100, 0.1) == 1.0  # cosine starts at the peak
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)  # the floor at the end
    assert lr_factor(500, 10, 100, 0.1) == pytest.approx(0.1)  # and after it
    assert lr_factor(0, 0, 1, 0.0) == 1.0  # no warmup, one step


def test_config_coercion_and_precedence():
    from lora_gpt2.training import config as tc

    assert tc.flag_values({"targets": "attn, lm_head", "rank": 4})["model"] == {
        "targets": ("attn", "lm_head"), "rank": 4}
    assert tc.flag_values({"lr": 1})["optim"]["lr"] == 1.0 and isinstance(tc.flag_values({"lr": 1})["optim"]["lr"], float)
    with pytest.raises(ValueError, match="rank must be an integer, got True"):
        tc.flag_values({"rank": True})
    with pytest.raises(ValueError, match="model.targets must be a list of names, got 3"):
        tc.read_toml_text("[model]\ntargets = 3\n")
    file_layer = tc.read_toml_text("[optim]\nlr = 0.01\nepochs = 2\n[model]\nrank = 16\n")
    resolved = tc.resolve(file_layer, tc.flag_values({"rank": 2, "max_steps": 7}))
    assert (resolved.model.rank, resolved.optim.lr) == (2, 0.01)  # flag > file
    assert (resolved.optim.max_steps, resolved.optim.epochs) == (7, None)  # a later layer's choice clears the other
    assert resolved.data == tc.DataSettings()  # defaults fill the rest


def test_torn_metrics_lines_are_skipped(tmp_path):
    from lora_gpt2.training import metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n[1, 2]\n{"step": "3"}\n'
                    '{"step": 4, "train_loss": 1.5}\n{"step": 5, "tr')
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 4]
    metrics.truncate_after(path, 3)
    assert path.read_text() == '{"step": 1, "train_loss": 2.0}\n'


def test_labml_toml_is_the_reference_experiment_by_its_parameter_count():
    """Rank 32 on all seven targets of GPT-2 small: the reference's trainable-parameter count, by hand."""
    from lora_gpt2.training import config as tc

    cfg = tc.resolve(tc.read_toml(ROOT / "configs" / "labml.toml"))
    with torch.device("meta"):
        model = GPT2(ModelConfig(), cfg.model.lora)
    r, d, v, ctx = 32, 768, 50257, 1024
    per_block = r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    expected = 12 * per_block + r * (v + d) + r * (ctx + d) + r * (d + v)
    assert lora.count_parameters(model)[0] == expected == 8_041_536
    assert cfg.model.lora.scaling == 1.0 and cfg.optim.optimizer == "adam" and cfg.optim.lr == 1e-4
    assert (cfg.data.batch_size, cfg.data.block_size, cfg.optim.epochs) == (32, 512, 10.0)


def test_draw_loss_leaves_the_callers_matplotlib_alone(tmp_path):
    import matplotlib

    from lora_gpt2.training.plot import draw_loss

    backend = matplotlib.get_backend()
    (tmp_path / "m.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "train_loss": 2.0, "val_loss": 2.5}\n')
    assert draw_loss(tmp_path / "m.jsonl", tmp_path / "loss.png")
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_train_help_shows_the_effective_defaults(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one help line per option
    code, out, _ = cli("train", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    for shown in ("(default: 8)", "(default: 16.0)", "(default: 0.0005)", "(default: gpt2)",
                  "(default: qkv_projection,output_projection,linear_in,linear_out)"):
        assert shown.replace(" ", "") in text.replace(" ", ""), shown


def test_subscribers_receive_typed_events_in_order(tiny_checkpoint, text_data, tmp_path):
    from lora_gpt2.training import Subscriber, train

    class Recorder(Subscriber):
        def __init__(self):
            self.events = []

        def handle(self, event):
            self.events.append(event)

    recorder = Recorder()
    result = train(train_config(tiny_checkpoint[0], text_data, tmp_path / "run", max_steps=4, eval_interval=2,
                                log_interval=1), subscribers=[recorder])
    names = [(e.kind, e.path.name if e.kind == "saved" else getattr(e, "step", None)) for e in recorder.events]
    best_saves = [i for i, n in enumerate(names) if n == ("saved", "best")]
    assert all(names[i - 1][0] == "evaluated" and recorder.events[i - 1].best for i in best_saves)
    assert ("saved", "best") == names[5]  # the first evaluation is always the best so far
    assert [n for n in names if n != ("saved", "best")] == [
        ("started", 0),
        ("stepped", 1), ("logged", None),
        ("stepped", 2), ("evaluated", 2), ("logged", None), ("saved", "last"),
        ("stepped", 3), ("logged", None),
        ("stepped", 4), ("evaluated", 4), ("logged", None), ("saved", "last"),
        ("finished", None)]
    logged = [e.record for e in recorder.events if e.kind == "logged"]
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == on_disk and recorder.events[-1].result == result


def test_generation_session_streams_text_pieces_and_stops_at_the_stop_token(tiny_checkpoint):
    from lora_gpt2 import tokenizer
    from lora_gpt2.inference.sampling import SamplingConfig
    from lora_gpt2.inference.session import GenerationSession

    session = GenerationSession(load_pretrained(tiny_checkpoint[0], targets=()))
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=None)
    stream = session.stream("ROMEO:", cfg, session.generator(3))
    pieces = list(stream)
    assert "".join(pieces) == tokenizer.decode(stream.tokens) or "\ufffd" in "".join(pieces)
    assert len(stream.tokens) == 30 and stream.finish_reason == "length"
    # the same seed with the first sampled token as the stop token ends before emitting it
    stop = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=None, stop_token=stream.tokens[0])
    stopped = session.stream("ROMEO:", stop, session.generator(3))
    assert list(stopped) == [] and stopped.tokens == [] and stopped.finish_reason == "stop"
