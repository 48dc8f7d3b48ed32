"""Command-line interface: the only part of lora-gpt2 that prints or exits.

Every error a user can cause ends as one line on stderr and exit code 1; set
LORA_GPT2_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from .. import __version__
from . import data_cmd, train_cmd, use_cmd  # noqa: F401  (they register their commands)
from .app import app
from .output import error_line


def _version(value: bool) -> None:
    if value:
        print(f"lora-gpt2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Fine-tune GPT-2 with LoRA from the command line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..errors import LoraGPT2Error

    return (LoraGPT2Error, ValueError, OSError)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="lora-gpt2", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, ...
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lora-gpt2`: help, not an error
            print(exc.ctx.get_help())
            code = 0
        else:
            print(error_line(exc.format_message()), file=sys.stderr)
            code = 1
    except (typer.Abort, KeyboardInterrupt):
        print(error_line("interrupted"), file=sys.stderr)
        code = 130
    except _user_errors() as exc:
        if os.environ.get("LORA_GPT2_DEBUG"):
            raise
        print(error_line(exc), file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.exit(code if isinstance(code, int) else 0)
