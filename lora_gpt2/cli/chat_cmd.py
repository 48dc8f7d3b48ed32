"""`lora-gpt2 chat`: a conversation with base + adapter in the terminal, or one answer for a script.

The conversation is rendered by the adapter's chat template (the one it was trained with, else
the default), and each reply ends where the template ends an assistant turn (<|endoftext|>).
Reply k of a session is sampled with seed + k, so the same inputs give the same conversation.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from .app import app
from .output import say
from .use_cmd import DTYPE_HELP, QUANTIZE_HELP, _load, check_quantize

Opt = typer.Option
COMMANDS = "/reset starts over, /system TEXT sets the system message, Ctrl-D leaves"


class Conversation:
    """The messages so far, kept within the model's context: when a prompt and its reply would
    not fit, the earliest turns go first (the system message stays)."""

    def __init__(self, template, context: int, max_new_tokens: int, system: str | None = None) -> None:
        self.template, self.context, self.max_new_tokens = template, context, max_new_tokens
        self.system = system
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def prompt(self, user: str) -> list[int]:
        """The tokens the model answers, with `user`'s message appended to the history."""
        self.messages.append({"role": "user", "content": user})
        dropped = 0
        while True:
            ids = self.template.prompt(self._full())
            if len(ids) + self.max_new_tokens <= self.context or len(self.messages) == 1:
                break
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
            dropped += 1
        if dropped:
            say(f"(the history was longer than the context of {self.context} tokens: the earliest "
                f"{dropped} exchange{'s' * (dropped != 1)} left it)")
        return ids

    def answered(self, reply: str) -> None:
        self.messages.append({"role": "assistant", "content": reply})

    def _full(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages


def _one_shot(text: str) -> list[dict]:
    """A script's input: a JSON conversation ({"messages": [...]} or the list), else one user message."""
    from ..chat_template import message_list

    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and "messages" in value:
            value = value["messages"]
        if isinstance(value, list):
            return message_list(value, "stdin", training=False)
    if not stripped:
        raise ValueError("nothing to answer: stdin is empty")
    return [{"role": "user", "content": text.rstrip("\n")}]


@app.command("chat")
def chat_cmd(
    adapter: Optional[str] = Opt(None, help="Run directory or adapter folder (lora-gpt2 or PEFT)."),
    model: Optional[str] = Opt(None, help="Base model; overrides the adapter's, or chats with it alone."),
    system: Optional[str] = Opt(None, help="The system message the conversation starts with."),
    max_new_tokens: int = Opt(200, min=1, help="Most tokens per reply."),
    temperature: float = Opt(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = Opt(200, help="Sample among the k most likely tokens."),
    top_p: float = Opt(1.0, help="Nucleus sampling: smallest set with this much probability."),
    seed: int = Opt(1337, help="Reply k is sampled with seed + k."),
    interactive: Optional[bool] = Opt(None, "--interactive/--one-shot",
                                      help="A conversation, line by line (default on a terminal), or one answer "
                                           "to all of stdin: text, or a JSON {\"messages\": [...]}."),
    dtype: str = Opt("auto", help=DTYPE_HELP),
    device: str = Opt("auto", help="auto, cpu, cuda or mps."),
    quantize: str = Opt("none", help=QUANTIZE_HELP),
    force: bool = Opt(False, "--force", help="Use the adapter even if the base model's fingerprint differs."),
) -> None:
    """Talk with base + adapter: replies streamed, history kept (/reset, /system TEXT, Ctrl-D)."""
    from .. import tokenizer
    from ..chat_template import ChatTemplate
    from ..errors import DataError
    from ..inference.sampling import SamplingConfig
    from ..inference.session import GenerationSession

    if not 0 <= seed < 2**62:
        raise ValueError(f"seed must be in [0, 2**62), got {seed}")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_token=tokenizer.EOT_ID)
    interactive = sys.stdin.isatty() if interactive is None else interactive
    given = None if interactive else _one_shot(_read_stdin())
    check_quantize(quantize)
    net, info = _load(adapter, model, dtype, device, force)
    template = info.chat_template if info else ChatTemplate()
    session = GenerationSession(net, quantize=quantize)
    talk = Conversation(template, net.config.n_positions, max_new_tokens, system)

    def reply(ids: list[int], turn: int) -> str:
        pieces = []
        for piece in session.stream(ids, cfg, session.generator(seed + turn)):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return "".join(pieces)

    if given is not None:
        reply(template.prompt(given if system is None else [{"role": "system", "content": system}, *given]), 0)
        return
    say(f"chatting with {info.path if info else net.base.source} ({COMMANDS})")
    turn = 0
    for line in _lines():
        if line.startswith("/reset"):
            talk.reset()
            say("(history cleared)")
        elif line.startswith("/system"):
            talk.system = line[len("/system"):].strip() or None
            say(f"(system message {'set' if talk.system else 'removed'})")
        elif line.startswith("/"):
            say(f"unknown command {line.split()[0]!r}: {COMMANDS}")
        elif line.strip():
            try:
                ids = talk.prompt(line)
            except DataError as exc:  # the template refused this conversation: say so, keep the rest
                talk.messages.pop()
                say(f"error: {exc}")
                continue
            talk.answered(reply(ids, turn))
            turn += 1


def _lines():
    """The user's lines until Ctrl-D (end of input); a prompt on a terminal."""
    terminal = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if terminal else "")
        except EOFError:
            if terminal:
                sys.stdout.write("\n")
            return
        yield line


def _read_stdin() -> str:
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"stdin is not UTF-8 text (invalid byte at offset {exc.start})") from None
