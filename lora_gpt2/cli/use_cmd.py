"""Using adapters: `generate`, `eval`, `merge`, `export`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .app import app
from .output import say

Opt = typer.Option
DTYPE_HELP = "Frozen weights: auto, float32, bfloat16, float16 (CUDA)."


def _load(adapter: Optional[str], model: Optional[str], dtype: str, device: str, force: bool):
    from ..adapters import load_with_adapter
    from ..distributed import pick_device
    from ..train_config import DTYPES
    from ..trainer import resolve_dtype

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if adapter is None and model is None:
        raise ValueError("nothing to load: pass --adapter RUN_OR_ADAPTER_DIR and/or --model")
    dev = pick_device(device)
    start = time.perf_counter()
    net, info = load_with_adapter(adapter, model=model, dtype=resolve_dtype(dtype, dev), device=dev, force=force)
    what = f"{net.source}" + (f" + adapter {info.path}" if info else "")
    say(f"loaded {what} in {time.perf_counter() - start:.2f}s ({dev}, {net.frozen_dtype()})".replace("torch.", ""))
    return net, info


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"prompt file {str(prompt_file)!r} not found") from None
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {prompt_file} is not UTF-8 text") from None
    if prompt is None and not sys.stdin.isatty():
        return sys.stdin.read()
    return prompt or ""


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text to continue (else --prompt-file or stdin)."),
    adapter: Optional[str] = Opt(None, help="Run directory or adapter folder (lora-gpt2 or PEFT)."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's, or samples it alone."),
    prompt_file: Optional[Path] = Opt(None, help="Read the prompt from this file."),
    max_new_tokens: int = Opt(200, help="Tokens to generate per sample."),
    temperature: float = Opt(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = Opt(200, help="Sample among the k most likely tokens."),
    top_p: float = Opt(1.0, help="Nucleus sampling: smallest set with this much probability."),
    num_samples: int = Opt(1, min=1, help="Number of samples."),
    seed: int = Opt(1337, help="Same seed, same text."),
    stop_at_eot: bool = Opt(False, "--stop-at-eot", help="End a sample at <|endoftext|>."),
    dtype: str = Opt("auto", help=DTYPE_HELP),
    device: str = Opt("auto", help="auto, cpu, cuda or mps."),
    json_out: bool = Opt(False, "--json", help="One JSON object per sample instead of streamed text."),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs."),
) -> None:
    """Sample text from the base model + adapter, streamed to stdout as it is generated."""
    import codecs

    import torch

    from .. import tokenizer
    from ..generate import SamplingConfig, generate as sample

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_token=tokenizer.EOT_ID if stop_at_eot else None)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    text = _read_prompt(prompt, prompt_file)
    net, _ = _load(adapter, model, dtype, device, force)
    ids = tokenizer.encode(text) or [tokenizer.EOT_ID]  # an empty prompt starts a new document
    if max_new_tokens == 0 and len(ids) > net.config.n_positions:
        raise ValueError(f"prompt has {len(ids)} tokens, longer than the model's context of "
                         f"{net.config.n_positions}, and --max-new-tokens is 0")
    enc = tokenizer.get_encoding()
    generator = torch.Generator(device=net.token_embedding.weight.device).manual_seed(seed)
    total_tokens, start = 0, time.perf_counter()
    for index in range(num_samples):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = []
        if not json_out:
            sys.stdout.write(text)
        for token in sample(net, ids, cfg, generator=generator):
            t = int(token[0])
            if cfg.stop_token is not None and t == cfg.stop_token:
                break
            piece = decoder.decode(enc.decode_single_token_bytes(t))
            pieces.append(piece)
            total_tokens += 1
            if not json_out:
                sys.stdout.write(piece)
                sys.stdout.flush()
        pieces.append(decoder.decode(b"", final=True))
        if json_out:
            print(json.dumps({"sample": index, "prompt": text, "completion": "".join(pieces), "seed": seed}))
        else:
            sys.stdout.write(pieces[-1] + ("\n" if index == num_samples - 1 else "\n---------------\n"))
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    say(f"{total_tokens} tokens in {elapsed:.2f}s ({total_tokens / max(elapsed, 1e-9):.1f} tokens/s)")


@app.command("eval")
def evaluate(
    adapter: Optional[str] = Opt(None, help="Run directory or adapter folder (lora-gpt2 or PEFT)."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's."),
    data: Optional[str] = Opt(None, help="Text file or folder (default: the run's validation data)."),
    block_size: Optional[int] = Opt(None, help="Window length (default: the run's)."),
    batch_size: Optional[int] = Opt(None, help="Windows per batch (default: the run's)."),
    eval_batches: Optional[int] = Opt(None, help="Batches to average (default: the run's)."),
    dtype: str = Opt("auto", help=DTYPE_HELP),
    device: str = Opt("auto", help="auto, cpu, cuda or mps."),
    json_out: bool = Opt(False, "--json", help="Print one JSON object."),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs."),
) -> None:
    """Loss and perplexity of the base model and of base + adapter, side by side."""
    import math

    from ..data import eval_batches as windows_of, open_tokens
    from ..prepare import ensure_prepared
    from ..trainer import evaluate as mean_loss

    net, info = _load(adapter, model, dtype, device, force)
    recorded = (info.meta.get("eval") or {}) if info else {}
    data = data or recorded.get("data") or "data/tinyshakespeare"
    block = block_size or recorded.get("block_size") or min(256, net.config.n_positions)
    batch = batch_size or recorded.get("batch_size") or 8
    batches = eval_batches or recorded.get("eval_batches") or 20
    for name, value in (("block-size", block), ("batch-size", batch), ("eval-batches", batches)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if block > net.config.n_positions:
        raise ValueError(f"block size {block} is longer than the model's context of {net.config.n_positions}")
    prepared = ensure_prepared(data)
    windows = windows_of(open_tokens(prepared.val), block, batch, batches)
    device_ = net.token_embedding.weight.device
    adapted = mean_loss(net, windows, device_) if info else None
    with net.lora_disabled():
        base = mean_loss(net, windows, device_)
    result = {"data": str(prepared.val), "windows": sum(x.size(0) for x, _ in windows), "block_size": block,
              "base": {"loss": base, "perplexity": math.exp(base)}}
    if adapted is not None:
        result["adapter"] = {"loss": adapted, "perplexity": math.exp(adapted)}
    if json_out:
        print(json.dumps(result))
        return
    print(f"{'':8} {'loss':>8} {'perplexity':>11}   ({result['windows']} windows of {block} tokens)")
    print(f"{'base':8} {base:8.4f} {math.exp(base):11.2f}")
    if adapted is not None:
        print(f"{'adapter':8} {adapted:8.4f} {math.exp(adapted):11.2f}")


@app.command()
def merge(
    adapter: str = typer.Argument(..., help="Run directory or adapter folder."),
    out_dir: Path = typer.Argument(..., help="Folder for the merged Hugging Face model."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's."),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs."),
) -> None:
    """Fold the adapter into the base weights: a plain GPT-2 folder transformers loads."""
    from ..merge import write_merged

    net, _ = _load(adapter, model, "float32", "cpu", force)
    write_merged(net, out_dir)
    say(f"wrote {out_dir} (config.json, model.safetensors, vocab.json, merges.txt); "
        f"load it with GPT2LMHeadModel.from_pretrained({str(out_dir)!r})")


@app.command()
def export(
    adapter: str = typer.Argument(..., help="Run directory or adapter folder."),
    out_dir: Path = typer.Argument(..., help="Folder for the exported adapter."),
    format: str = Opt("peft", "--format", help="Export format: peft."),
) -> None:
    """Export an adapter for another library (PEFT: adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    from ..adapters import read_adapter
    from ..checkpoint import ADAPTER_FILE
    from ..peft_io import export_peft

    if format != "peft":
        raise ValueError(f"unknown export format {format!r}; supported: peft")
    info = read_adapter(adapter)
    if info.kind != "lora-gpt2":
        raise ValueError(f"{adapter} is already a PEFT adapter")
    n_layer = int(info.meta.get("base_config", {}).get("n_layer", 0))
    export_peft(load_file(info.path / ADAPTER_FILE), info.lora, n_layer, info.base_model, out_dir)
    say(f"wrote {out_dir} (adapter_config.json, adapter_model.safetensors) for peft.PeftModel.from_pretrained")
