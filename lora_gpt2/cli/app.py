"""The Typer application every command registers on."""

import typer

app = typer.Typer(
    name="lora-gpt2",
    help="Fine-tune GPT-2 with LoRA: download data, train adapters, generate, evaluate, merge, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
