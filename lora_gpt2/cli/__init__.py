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
from . import chat_cmd, data_cmd, serve_cmd, train_cmd, use_cmd  # noqa: F401  (they register their commands)
from .app import app
from .output import error_line
from .signals import ExitOnSignals, StoppedAtOnce, Terminated


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


def _with_value(message: str, argv: list[str] | None) -> str:
    """Typer names the option but not what was given; add the value from the command line."""
    import re

    match = re.match(r"Invalid value for '(--[\w-]+)'", message)
    args = sys.argv[1:] if argv is None else argv
    if not match:
        return message
    option = match.group(1)
    for i in reversed(range(len(args))):  # the last occurrence is the one that counts
        if args[i] == option and i + 1 < len(args):
            return f"{message} (got {args[i + 1]!r})"
        if args[i].startswith(option + "="):
            return f"{message} (got {args[i].split('=', 1)[1]!r})"
    return message


def _runtime_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text:
        return f"out of memory ({text[:160]}); reduce --batch-size, --block-size or --rank, or use --dtype bfloat16"
    return f"{type(exc).__name__}: {text[:300]} (LORA_GPT2_DEBUG=1 shows the traceback)"


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _spell_resume(args: list[str]) -> list[str]:
    """`train --resume` alone (last, or before another option) means `--resume yes`: an optional
    value, which typer cannot declare. Any other word after it is its value, checked by typer."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--resume=yes"
    return out


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    args = _spell_resume(sys.argv[1:] if argv is None else list(argv))
    try:
        with ExitOnSignals():
            code = command.main(args=args, prog_name="lora-gpt2", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except SystemExit as exc:
        # click turns a broken pipe into exit 1 after wrapping stdout; a reader that left
        # (`generate | head`) is not an error, and `set -o pipefail` pipelines rely on exit 0
        code = 0 if "PacifyFlushWrapper" in type(sys.stdout).__name__ else exc.code
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, ...
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `lora-gpt2`: help, not an error
            print(exc.ctx.get_help())
            code = 0
        else:
            print(error_line(_with_value(exc.format_message(), argv)), file=sys.stderr)
            code = 1
    except StoppedAtOnce:
        print(error_line("stopped at once by a second Ctrl-C, without saving this step; the last checkpoint "
                         "is intact (continue with --resume)"), file=sys.stderr)
        code = 130
    except (typer.Abort, KeyboardInterrupt):
        print(error_line("interrupted"), file=sys.stderr)
        code = 130
    except Terminated as exc:
        print(error_line(f"stopped by {exc.name}"), file=sys.stderr)
        code = exc.exit_code
    except BrokenPipeError:
        _silence_stdout()
        code = 0
    except _user_errors() as exc:
        if os.environ.get("LORA_GPT2_DEBUG"):
            raise
        print(error_line(exc), file=sys.stderr)
        code = 1
    except (MemoryError, RuntimeError) as exc:
        if os.environ.get("LORA_GPT2_DEBUG"):
            raise
        print(error_line(_runtime_message(exc)), file=sys.stderr)
        code = 1
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if os.environ.get("LORA_GPT2_DEBUG"):
            raise
        print(error_line(f"unexpected {type(exc).__name__}: {exc} (LORA_GPT2_DEBUG=1 shows the traceback)"),
              file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `lora-gpt2 generate | head`: the reader left, which is fine
        _silence_stdout()
    sys.exit(code if isinstance(code, int) else 0)
