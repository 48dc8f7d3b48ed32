"""Using adapters: `generate`, `eval`, `merge`, `export`. The library does the work; these talk."""

from __future__ import annotations

import contextlib
import dataclasses
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
QUANTIZE_HELP = ("Decode with the linear weights as none (float) or int8 (weight-only, a scale per output "
                 "channel, the adapter folded in first; the README's int8 section has its speed and accuracy).")
EXAMPLE_KINDS = ("prompt/completion", "examples")


def check_quantize(name: str) -> None:
    """A wrong --quantize is named before the model loads."""
    from ..inference.layouts import weight_format

    weight_format(name)


def _load(adapter: Optional[str], model: Optional[str], dtype: str, device: str, force: bool):
    from ..checkpoints.reading import load_with_adapter
    from ..devices import dtype_name

    if adapter is None and model is None:
        raise ValueError("nothing to load: pass --adapter RUN_OR_ADAPTER_DIR and/or --model")
    start = time.perf_counter()
    net, info = load_with_adapter(adapter, model=model, dtype=dtype, device=device, force=force)
    what = net.base.source + (f" + adapter {info.path}" if info else "")
    device_ = net.token_embedding.weight.device
    say(f"loaded {what} in {time.perf_counter() - start:.2f}s ({device_}, {dtype_name(net.frozen_dtype())})")
    return net, info


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"prompt file {str(prompt_file)!r} not found") from None
        except IsADirectoryError:
            raise ValueError(f"prompt file {prompt_file} is a folder") from None
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {prompt_file} is not UTF-8 text") from None
    if prompt is None and not sys.stdin.isatty():
        if not hasattr(sys.stdin, "buffer"):  # a text stream handed in (tests, embedding)
            return sys.stdin.read()
        raw = sys.stdin.buffer.read()  # bytes: the terminal's locale does not decide what is valid
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the prompt read from stdin is not UTF-8 text (invalid byte at offset {exc.start})"
                             ) from None
    return prompt or ""


def stops_at_eot(flag: Optional[bool], info) -> bool:
    """--stop-at-eot as given; unset, on for an adapter trained on examples (JSONL, CSV), which
    all ended with <|endoftext|>, so a sample ends where its examples did."""
    if flag is not None:
        return flag
    return bool(info is not None and info.eval_settings.get("data_kind") in EXAMPLE_KINDS)


@app.command("generate")
def generate_cmd(
    prompt: Optional[str] = typer.Argument(None, help="Text to continue (else --prompt-file or stdin)."),
    adapter: Optional[str] = Opt(None, help="Run directory or adapter folder (lora-gpt2 or PEFT)."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's, or samples it alone."),
    prompt_file: Optional[Path] = Opt(None, help="Read the prompt from this file."),
    max_new_tokens: int = Opt(200, help="Tokens to generate per sample."),
    temperature: float = Opt(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = Opt(200, help="Sample among the k most likely tokens."),
    top_p: float = Opt(1.0, help="Nucleus sampling: smallest set with this much probability."),
    num_samples: int = Opt(1, min=1, help="Number of samples (sample i is drawn with seed + i)."),
    batch_size: int = Opt(8, min=1, help="Samples decoded together in one batch (more: faster, more memory)."),
    seed: int = Opt(1337, help="Same seed, same text, whatever --batch-size."),
    stop_at_eot: Optional[bool] = Opt(None, "--stop-at-eot/--no-stop-at-eot",
                                      help="End a sample at <|endoftext|> (default: on for an adapter trained on "
                                           "examples, JSONL or CSV, which end with it; off otherwise)."),
    dtype: str = Opt("auto", help=DTYPE_HELP),
    device: str = Opt("auto", help="auto, cpu, cuda or mps."),
    quantize: str = Opt("none", help=QUANTIZE_HELP),
    json_out: bool = Opt(False, "--json", help="One JSON object per sample instead of streamed text."),
    chat: bool = Opt(False, "--chat", help="Answer the prompt as a user's message, rendered by the adapter's chat "
                                           "template; a sample ends with the assistant's turn."),
    system: Optional[str] = Opt(None, help="--chat: a system message before the prompt."),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs."),
) -> None:
    """Sample text from the base model + adapter, streamed to stdout as it is generated."""
    from .. import tokenizer
    from ..inference.sampling import SamplingConfig
    from ..inference.session import GenerationSession

    if not 0 <= seed <= 2**63 - num_samples:
        raise ValueError(f"seed must be in [0, 2**63 - num_samples], got {seed}")
    # checked before the model loads, which takes seconds for the larger GPT-2s
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if system is not None and not chat:
        raise ValueError("--system is for --chat")
    text = _read_prompt(prompt, prompt_file)
    check_quantize(quantize)
    net, info = _load(adapter, model, dtype, device, force)
    if stops_at_eot(stop_at_eot, info) or (chat and stop_at_eot is None):
        cfg = dataclasses.replace(cfg, stop_token=tokenizer.EOT_ID)
    ids: str | list[int] = text
    if chat:
        from ..chat_template import ChatTemplate

        messages = [{"role": "system", "content": system}] if system is not None else []
        ids = (info.chat_template if info else ChatTemplate()).prompt(messages + [{"role": "user", "content": text}])
    session = GenerationSession(net, quantize=quantize)
    total_tokens, start = 0, time.perf_counter()
    streams = session.stream_samples(ids, cfg, [seed + i for i in range(num_samples)], batch_size)
    for index, stream in enumerate(streams):
        if json_out:
            completion = "".join(stream)
            print(json.dumps({"sample": index, "prompt": text, "completion": completion, "seed": seed + index,
                              "tokens": len(stream.tokens), "finish_reason": stream.finish_reason}))
        else:
            sys.stdout.write("" if chat else text)  # a chat answer is the reply alone
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n" if index == num_samples - 1 else "\n---------------\n")
        sys.stdout.flush()
        total_tokens += len(stream.tokens)
    elapsed = time.perf_counter() - start
    say(f"{total_tokens} tokens in {elapsed:.2f}s ({total_tokens / max(elapsed, 1e-9):.1f} tokens/s)")


@app.command("eval")
def eval_cmd(
    adapter: Optional[str] = Opt(None, help="Run directory or adapter folder (lora-gpt2 or PEFT)."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's."),
    data: Optional[str] = Opt(None, help="Text, JSONL or CSV file, or folder (default: the run's validation data)."),
    block_size: Optional[int] = Opt(None, help="Window length (default: the run's)."),
    batch_size: Optional[int] = Opt(None, help="Windows per batch (default: the run's)."),
    eval_batches: Optional[int] = Opt(None, help="Batches to average (default: the run's)."),
    dtype: str = Opt("auto", help=DTYPE_HELP),
    device: str = Opt("auto", help="auto, cpu, cuda or mps."),
    mask_prompt: Optional[bool] = Opt(None, "--mask-prompt/--no-mask-prompt",
                                      help="Count only completions (default: the run's; on for prompt/completion)."),
    train_on: Optional[str] = Opt(None, help="Chat data: count the assistant's turns (assistant) or every token "
                                             "(all); default: the run's, else assistant."),
    text_column: Optional[str] = Opt(None, help="CSV: the column of texts (default: the run's, or 'text')."),
    prompt_column: Optional[str] = Opt(None, help="CSV: the prompt column (default: the run's, or 'prompt')."),
    completion_column: Optional[str] = Opt(None, help="CSV: the completion column (default: 'completion')."),
    quantize: str = Opt("none", help="Evaluate each model with its linear weights as generate --quantize decodes "
                                     "them: none or int8."),
    json_out: bool = Opt(False, "--json", help="Print one JSON object (a loss that is not finite is null)."),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs."),
) -> None:
    """Loss and perplexity of the base model and of base + adapter, side by side."""
    from ..training.evaluation import check_given, compare, resolve_settings

    check_given(data=data, block_size=block_size, batch_size=batch_size, eval_batches=eval_batches)
    check_quantize(quantize)
    net, info = _load(adapter, model, dtype, device, force)
    settings = resolve_settings(info.eval_settings if info else {}, net.config.n_positions, data=data,
                                block_size=block_size, batch_size=batch_size, eval_batches=eval_batches,
                                mask_prompt=mask_prompt, train_on=train_on, text_column=text_column,
                                prompt_column=prompt_column, completion_column=completion_column,
                                chat_template=_trained_text(info))
    from ..inference.layouts import DecodeLayout

    within = (lambda: DecodeLayout(net, quantize)) if quantize != "none" else contextlib.nullcontext
    report = compare(net, settings, with_adapter=info is not None, within=within).to_dict()
    if json_out:
        print(json.dumps(report, allow_nan=False))
        return
    print(f"{'':8} {'loss':>8} {'perplexity':>11}   ({report['windows']} windows of {report['block_size']} tokens)")
    for name in ("base", "adapter"):
        if name in report:
            entry = report[name]
            if entry["loss"] is None:
                print(f"{name:8} {'n/a':>8} {'n/a':>11}   ({entry['reason']})")
            else:
                print(f"{name:8} {entry['loss']:8.4f} {entry['perplexity']:11.2f}")


@app.command("merge")
def merge_cmd(
    adapter: str = typer.Argument(..., help="Run directory or adapter folder."),
    out_dir: Path = typer.Argument(..., help="Folder for the merged Hugging Face model."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's."),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs, "
                                             "and write into a folder holding other files."),
) -> None:
    """Fold the adapter into the base weights: a plain GPT-2 folder transformers loads."""
    from ..checkpoints.merged import write_merged
    from ..checkpoints.outputs import MERGED_FILES, check_output_dir

    check_output_dir(out_dir, MERGED_FILES, force)
    net, info = _load(adapter, model, "float32", "cpu", force)
    write_merged(net, out_dir, info.trained_template if info else None)
    say(f"wrote {out_dir} (config.json, model.safetensors, tokenizer files{_with_template(info)}); "
        f"load it with GPT2LMHeadModel.from_pretrained({str(out_dir)!r})")


@dataclasses.dataclass(frozen=True)
class _Export:
    """What `export` was asked for; each format's writer takes what it needs."""

    adapter: str
    out: Path
    format: str
    gguf_type: str
    base_only: bool
    model: Optional[str]
    force: bool


def _trained_text(info) -> str | None:
    """A chat-trained adapter's template text (None for others: they have none to carry)."""
    template = info.trained_template if info is not None else None
    return template.text if template is not None else None


def _with_template(info) -> str:
    return " with its chat template" if _trained_text(info) is not None else ""


def _export_peft(e: _Export) -> None:
    from ..checkpoints.reading import read_adapter
    from ..checkpoints.outputs import PEFT_FILES, check_output_dir
    from ..checkpoints.peft import export_peft

    if e.base_only or e.model is not None:
        raise ValueError("--base-only and --model apply to the gguf formats, not to --format peft")
    check_output_dir(e.out, PEFT_FILES, e.force)
    info = read_adapter(e.adapter)  # checked against its sha256, like every other reader
    if info.kind != "lora-gpt2":
        raise ValueError(f"{e.adapter} is already a PEFT adapter")
    n_layer = int((info.meta.get("base_config") or {}).get("n_layer", 0))
    export_peft(info.tensors, info.lora, n_layer, info.base_model, e.out)
    template = info.trained_template
    if template is not None:  # the tokenizer beside it: AutoTokenizer.from_pretrained(OUT) renders chats alike
        from ..checkpoints.merged import write_tokenizer

        write_tokenizer(e.out, int((info.meta.get("base_config") or {}).get("n_positions", 1024)), template)
    say(f"wrote {e.out} (adapter_config.json, adapter_model.safetensors{_with_template(info)}) "
        "for peft.PeftModel.from_pretrained")


def _export_gguf(e: _Export) -> None:
    from ..checkpoints import gguf_file
    from ..checkpoints.outputs import check_output_file

    gguf_file.check_type(e.gguf_type)
    gguf_file.require_gguf()
    if e.base_only and e.format != "gguf":
        raise ValueError("--base-only writes a model: use it with --format gguf")
    check_output_file(e.out, e.force)
    net, info = _load(e.adapter, e.model, "float32", "cpu", e.force)
    start = time.perf_counter()
    name = Path(e.adapter).name
    if e.format == "gguf-lora":
        written = gguf_file.write_lora(net, e.out, e.gguf_type, name=name)
        base_cmd = f"lora-gpt2 export --format gguf --base-only {e.adapter} BASE.gguf"
        use = f"apply it to the base from `{base_cmd}`: llama-cli -m BASE.gguf --lora {e.out}"
    else:
        own_output = e.base_only and gguf_file.needs_own_output(net)
        written = gguf_file.write_model(net, e.out, e.gguf_type, merged=not e.base_only, own_output=own_output,
                                        name=name if not e.base_only else net.base.source,
                                        chat_template=None if e.base_only else _trained_text(info))
        use = f"run it with: llama-cli -m {e.out}"
    types = ", ".join(f"{n} {t.lower()}" for t, n in sorted(written.types.items()))
    size = f"{written.bytes / 1e6:.1f} MB" if written.bytes >= 1e6 else f"{written.bytes / 1e3:.1f} kB"
    say(f"wrote {e.out} ({written.tensors} tensors: {types}; {size}) "
        f"in {time.perf_counter() - start:.1f}s; {use}")


# --format NAME -> (what it writes, its writer): a new format is one function and one row
EXPORT_FORMATS = {
    "peft": ("adapter_config.json + adapter_model.safetensors, for peft.PeftModel", _export_peft),
    "gguf": ("the merged model as one file, for llama.cpp", _export_gguf),
    "gguf-lora": ("the adapter alone, for llama.cpp's --lora", _export_gguf),
}


@app.command("export")
def export_cmd(
    adapter: str = typer.Argument(..., help="Run directory or adapter folder."),
    out: Path = typer.Argument(..., help="Folder (peft) or file (gguf, gguf-lora) to write."),
    format: str = Opt("peft", "--format",
                      help="; ".join(f"{k}: {what}" for k, (what, _) in EXPORT_FORMATS.items()) + "."),
    gguf_type: str = Opt("f16", "--gguf-type", help="GGUF weights: f32, f16, bf16 or q8_0 (norms, biases and "
                                                    "the position embedding stay f32)."),
    base_only: bool = Opt(False, "--base-only", help="gguf: the adapter's base model alone, the file its "
                                                     "gguf-lora export applies to."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's (gguf formats)."),
    force: bool = Opt(False, "--force", help="Write into a folder holding other files (peft) or replace a file "
                                             "(gguf); use the adapter even if the base fingerprint differs."),
) -> None:
    """Export for another tool: PEFT, or GGUF for llama.cpp (merged, base alone, or LoRA alone)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}")
    EXPORT_FORMATS[format][1](_Export(adapter, out, format, gguf_type, base_only, model, force))
