"""GGUF export, read back by the gguf package (llama.cpp's own reader): names, metadata, tensors,
tokenizer, types, and every refusal. llama.cpp running the files is tests/test_llama_cpp.py."""

import json

import numpy as np
import pytest
import torch

from lora_gpt2 import layout, load_pretrained
from lora_gpt2.checkpoints.merged import merged_parameters
from lora_gpt2.tokenizer import ASSETS

from helpers import make_adapter, make_hf_model, save_hf_model

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'lora-gpt2[gguf]')")


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-adapters")
    ckpt = tiny_checkpoint[0]
    return {
        "blocks": make_adapter(ckpt, root / "blocks", ("attn", "ffn")),
        "tied": make_adapter(ckpt, root / "tied", ("token_embedding", "lm_head"), seed=2),
    }


class Fields:
    """A GGUF file's metadata, each value decoded when asked for (the 50,257 tokens take seconds)."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, key):
        return self.reader.fields[key].contents()


def read(path):
    reader = gguf.GGUFReader(path)
    return Fields(reader), {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy's (rows, columns) order, dequantised if need be."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in tensor.shape])))


def test_tensor_names_are_llama_cpps_own(tiny_checkpoint):
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 3)
    for module in layout.MODULES:
        for (_, hf), (_, ours) in zip(layout.module_paths(module, 3), layout.gguf_paths(module, 3)):
            assert names.get_name(hf) == ours, hf


def test_merged_f32_holds_the_merged_weights_and_the_tokenizer(adapters, tmp_path, cli):
    run, model = adapters["tied"]
    out = tmp_path / "merged.gguf"
    code, _, err = cli("export", "--format", "gguf", "--gguf-type", "f32", run, out)
    assert code == 0, err
    assert f"wrote {out}" in err and "llama-cli -m" in err
    fields, tensors = read(out)
    config = model.config
    assert fields["general.architecture"] == "gpt2" and fields["general.type"] == "model"
    assert (fields["gpt2.block_count"], fields["gpt2.context_length"], fields["gpt2.embedding_length"],
            fields["gpt2.feed_forward_length"], fields["gpt2.attention.head_count"]) == (
        config.n_layer, config.n_positions, config.n_embd, 4 * config.n_embd, config.n_head)
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config.layer_norm_epsilon)
    assert fields["general.file_type"] == 0
    encoder = json.loads((ASSETS / "encoder.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(encoder, key=encoder.get)
    merges = (ASSETS / "vocab.bpe").read_text().splitlines()[1:]
    assert fields["tokenizer.ggml.merges"] == [m for m in merges if m]
    assert fields["tokenizer.ggml.eos_token_id"] == 50256 and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.token_type"][50256] == gguf.TokenType.CONTROL
    with merged_parameters(model) as (params, tied):
        assert not tied  # an update on the embedding unties the pair: output.weight is its own
        expected = {f"{g}.{t}": params[f"{o}.{t}"] for m in layout.MODULES
                    for o, g in layout.gguf_paths(m, config.n_layer) for t in m.tensors}
        assert set(tensors) == set(expected)
        for name, tensor in expected.items():
            assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(values(tensors[name]), tensor.numpy(), err_msg=name)
    assert not torch.equal(params["token_embedding.weight"], params["lm_head.weight"])


@pytest.mark.parametrize("gguf_type,tolerance", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 2e-2)])
def test_each_type_packs_the_weights_and_keeps_norms_and_positions_f32(adapters, tmp_path, cli, gguf_type, tolerance):
    run, model = adapters["blocks"]
    out = tmp_path / f"{gguf_type}.gguf"
    assert cli("export", "--format", "gguf", "--gguf-type", gguf_type, run, out)[0] == 0
    fields, tensors = read(out)
    packed = gguf.GGMLQuantizationType[gguf_type.upper()]
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
    assert "output.weight" not in tensors  # tied and untouched: llama.cpp reuses token_embd
    with merged_parameters(model) as (params, _):
        for m in layout.MODULES:
            for ours, name in layout.gguf_paths(m, model.config.n_layer):
                for t in m.tensors if m.ours != "lm_head" else ():
                    tensor = tensors[f"{name}.{t}"]
                    keep = t == "bias" or m.kind == "norm" or m.ours == "position_embedding"
                    assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if keep else packed), name
                    expected = params[f"{ours}.{t}"].numpy()
                    error = np.abs(values(tensor) - expected).max() / np.abs(expected).max()
                    assert error <= (0 if keep else tolerance), (name, error)


def test_q8_0_rows_that_are_not_blocks_of_32_fall_back_to_f16(tmp_path, cli):
    narrow = save_hf_model(make_hf_model(n_embd=24, n_head=2), tmp_path / "narrow")
    run, _ = make_adapter(narrow, tmp_path / "run", ("qkv_projection",))
    out = tmp_path / "q8.gguf"
    code, _, err = cli("export", "--format", "gguf", "--gguf-type", "q8_0", run, out)
    assert code == 0, err
    _, tensors = read(out)
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 96


def test_lora_file_holds_a_and_b_in_llama_cpps_orientation(adapters, tmp_path, cli):
    out = tmp_path / "lora.gguf"
    for name in ("blocks", "tied"):
        run, model = adapters[name]
        code, _, err = cli("export", "--format", "gguf-lora", "--gguf-type", "f32", run, out, "--force")
        assert code == 0, err
        assert "--base-only" in err and "--lora" in err
        fields, tensors = read(out)
        assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
        layers = model.lora_layers()
        assert fields["adapter.lora.alpha"] == pytest.approx(8.0)  # scaling 2 at rank 4
        expected = {}
        for m in layout.MODULES:
            for ours, gname in layout.gguf_paths(m, model.config.n_layer):
                if ours in layers:
                    a, b = layers[ours].lora_a.detach(), layers[ours].lora_b.detach()
                    expected[f"{gname}.weight.lora_a"] = a.T if m.kind == "embedding" else a
                    expected[f"{gname}.weight.lora_b"] = b
        assert set(tensors) == set(expected) and expected
        for key, tensor in expected.items():
            np.testing.assert_array_equal(values(tensors[key]), tensor.numpy(), err_msg=key)


def test_rslora_scaling_travels_as_alpha(tiny_checkpoint, tmp_path, cli):
    run, _ = make_adapter(tiny_checkpoint[0], tmp_path / "rs", ("qkv_projection",), rslora=True)
    out = tmp_path / "rs.gguf"
    assert cli("export", "--format", "gguf-lora", run, out)[0] == 0
    fields, _ = read(out)
    # llama.cpp multiplies by alpha / r: alpha = scaling * r = (8 / sqrt(4)) * 4
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)


def test_base_only_carries_its_own_output_when_the_adapter_needs_it(adapters, tiny_checkpoint, tmp_path, cli):
    base = load_pretrained(tiny_checkpoint[0], targets=())
    for name, own_output in (("blocks", False), ("tied", True)):
        out = tmp_path / f"{name}-base.gguf"
        code, _, err = cli("export", "--format", "gguf", "--base-only", "--gguf-type", "f32", adapters[name][0], out)
        assert code == 0, err
        _, tensors = read(out)
        assert ("output.weight" in tensors) is own_output
        np.testing.assert_array_equal(values(tensors["token_embd.weight"]),
                                      base.token_embedding.weight.detach().numpy())
        np.testing.assert_array_equal(values(tensors["blk.1.attn_qkv.weight"]),
                                      base.blocks[1].attn.qkv_projection.weight.detach().numpy())
        if own_output:
            np.testing.assert_array_equal(values(tensors["output.weight"]), base.lm_head.weight.detach().numpy())


def _nothing_written(folder, name):
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("args,message", [
    (("--gguf-type", "q4_0"), "--gguf-type 'q4_0' is not one this exporter writes for llama.cpp's GPT-2; "
                              "choose one of f32, f16, bf16, q8_0"),
    (("--format", "gguf-lora", "--base-only"), "--base-only writes a model: use it with --format gguf"),
    (("--format", "peft", "--base-only"), "--base-only and --model apply to the gguf formats"),
])
def test_bad_options_are_one_line_and_write_nothing(adapters, tmp_path, cli, args, message):
    code, out, err = cli("export", "--format", "gguf", *args, adapters["blocks"][0], tmp_path / "x.gguf")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    _nothing_written(tmp_path, "x.gguf")


def test_a_damaged_adapter_is_refused_and_nothing_is_written(adapters, tmp_path, cli):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(adapters["blocks"][0], damaged)
    weights = damaged / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = cli("export", "--format", "gguf", damaged, tmp_path / "x.gguf")
    assert code == 1 and "sha256" in err and str(weights) in err and len(err.strip().splitlines()) == 1
    _nothing_written(tmp_path, "x.gguf")


def test_output_inside_the_run_an_existing_file_or_a_folder_is_refused(adapters, tmp_path, cli):
    run = adapters["blocks"][0]
    code, _, err = cli("export", "--format", "gguf", run, run / "model.gguf")
    assert code == 1 and "is inside the training run or adapter" in err
    assert not (run / "model.gguf").exists()
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"mine")
    code, _, err = cli("export", "--format", "gguf", run, existing)
    assert code == 1 and f"output {existing} exists; pass --force to replace it" in err
    assert existing.read_bytes() == b"mine"
    code, _, err = cli("export", "--format", "gguf", run, tmp_path)
    assert code == 1 and "is a folder; give the file to write" in err
    code, _, err = cli("export", "--format", "gguf", "--force", "--gguf-type", "f32", run, existing)
    assert code == 0 and existing.read_bytes()[:4] == b"GGUF"


def test_what_llama_cpp_cannot_hold_is_refused_by_name(tiny_checkpoint, tmp_path, cli):
    ckpt = tiny_checkpoint[0]
    dora, _ = make_adapter(ckpt, tmp_path / "dora", ("qkv_projection",), variant="dora")
    code, _, err = cli("export", "--format", "gguf-lora", dora, tmp_path / "d.gguf")
    assert code == 1 and "a dora adapter cannot be written as a LoRA GGUF" in err and "--format gguf" in err
    _nothing_written(tmp_path, "d.gguf")
    assert cli("export", "--format", "gguf", dora, tmp_path / "d.gguf")[0] == 0  # merged, it can
    positions, _ = make_adapter(ckpt, tmp_path / "pos", ("position_embedding",))
    code, _, err = cli("export", "--format", "gguf-lora", positions, tmp_path / "p.gguf")
    assert code == 1 and "llama.cpp applies no LoRA to the position embedding" in err
    exact_gelu = save_hf_model(make_hf_model(activation_function="gelu"), tmp_path / "erf")
    run, _ = make_adapter(exact_gelu, tmp_path / "erf-run", ("qkv_projection",))
    code, _, err = cli("export", "--format", "gguf", run, tmp_path / "e.gguf")
    assert code == 1 and "activation 'gelu' cannot be exported to GGUF" in err
    small = save_hf_model(make_hf_model(vocab_size=128), tmp_path / "v128")
    run, _ = make_adapter(small, tmp_path / "v-run", ("qkv_projection",))
    code, _, err = cli("export", "--format", "gguf", run, tmp_path / "v.gguf")
    assert code == 1 and "vocab_size 128 cannot be exported to GGUF" in err
    _nothing_written(tmp_path, "v.gguf")


def test_without_the_gguf_package_the_install_command_is_named(adapters, tmp_path, cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    code, _, err = cli("export", "--format", "gguf", adapters["blocks"][0], tmp_path / "x.gguf")
    assert code == 1 and "GGUF export needs the gguf package: pip install 'lora-gpt2[gguf]'" in err
    _nothing_written(tmp_path, "x.gguf")


def test_a_write_that_fails_midway_leaves_no_file(adapters, tmp_path, cli, monkeypatch):
    from lora_gpt2.checkpoints import gguf_file

    real, calls = gguf_file._add, []

    def failing(*args):
        calls.append(args[2])
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(gguf_file, "_add", failing)
    code, _, err = cli("export", "--format", "gguf", adapters["blocks"][0], tmp_path / "x.gguf")
    assert code == 1 and f"cannot write {tmp_path / 'x.gguf'}: No space left on device; nothing was written" in err
    _nothing_written(tmp_path, "x.gguf")
