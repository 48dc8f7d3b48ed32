"""Conversations as GPT-2 tokens: the chat template, its rendering, and which tokens are learned.

GPT-2 has no chat template of its own, so lora-gpt2 defines one (`DEFAULT`): plain-text role
markers, a blank line between messages, and `<|endoftext|>` closing each assistant turn, which
is where generation stops. `--chat-template FILE` takes any Hugging Face style Jinja template
instead, rendered as transformers' `apply_chat_template` renders it (a sandboxed environment
with trim_blocks and lstrip_blocks, `raise_exception`, `tojson`), and tokenized the same way
(`<|endoftext|>` in the text is the special token), so both give the same ids.

Which tokens a conversation teaches needs no markup in the template: an assistant turn is
what the template adds between the conversation before it rendered with the generation
prompt and the conversation including it, which is exactly what the model must produce when
asked. The template travels with the adapter (adapter.json's "chat_template": text and
sha256), so every reader renders conversations as training did.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import tokenizer
from .errors import DataError

ROLES = ("system", "user", "assistant")
TOKENIZER_CONFIG = "tokenizer_config.json"  # where transformers reads a "chat_template" from
DEFAULT = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}Assistant:{% endif %}"
)
# Per-token marks of a rendered conversation (one uint8 per token in the prepared .mask file).
LEARN = 1  # an assistant token the loss counts (its turn's weight is not 0)
MESSAGE = 2  # a message starts at this token: where an over-long conversation may be cut
SYSTEM = 4  # part of the leading system message, kept when earlier turns are dropped
ASSISTANT = 8  # an assistant message starts here: the last one is never dropped


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markup) renders
        its body: the turns are found without it, so a template written for it works here."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


@functools.lru_cache(maxsize=8)
def _compiled(text: str):
    import jinja2

    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"the chat template does not parse: line {exc.lineno}: {exc.message}") from None


def message_list(messages: Any, where: str, *, training: bool) -> list[dict[str, Any]]:
    """`messages` checked and made plain: each a role and a string content (a list of text
    parts is joined, as OpenAI's format allows); `weight` 0 or 1 on assistant turns, `name`
    kept for templates that read it. Training data must hold an assistant turn and end with
    one; a request must not end with one (the model answers the last turn)."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    plain = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{at} has no {key!r}")
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        entry = {"role": role, "content": _content(message["content"], at)}
        if "name" in message:
            if not isinstance(message["name"], str):
                raise DataError(f"{at}: 'name' must be a string, got {type(message['name']).__name__}")
            entry["name"] = message["name"]
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
                raise DataError(f"{at}: 'weight' must be 0 or 1 on an assistant message, got {weight!r}"
                                + ("" if role == "assistant" else f" on a {role} message"))
            entry["weight"] = int(weight)
        plain.append(entry)
    last = plain[-1]["role"]
    if training:
        if not any(m["role"] == "assistant" for m in plain):
            raise DataError(f"{where}: no assistant message: nothing to learn")
        if last != "assistant":
            raise DataError(f"{where}: the conversation ends with a {last} message; training needs it to end "
                            "with the assistant's answer")
    elif last == "assistant":
        raise DataError(f"{where}: the last message is the assistant's; end with a user message to be answered")
    return plain


def _content(content: Any, at: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f"{at}: content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}})")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{at}: 'content' must be a string or a list of text parts, got {type(content).__name__}")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, and what it makes of a conversation."""

    text: str = DEFAULT
    origin: str = "the default chat template"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def is_default(self) -> bool:
        return self.text == DEFAULT

    def record(self) -> dict[str, str]:
        """adapter.json's "chat_template"."""
        return {"text": self.text, "sha256": self.sha256}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return _compiled(self.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               bos_token=tokenizer.EOT_TOKEN, eos_token=tokenizer.EOT_TOKEN,
                                               unk_token=tokenizer.EOT_TOKEN)
        except jinja2.TemplateError as exc:
            raise DataError(f"{self.origin} failed to render: {exc}") from None

    def prompt(self, messages: list[dict]) -> list[int]:
        """The tokens a model answers: the conversation with the generation prompt."""
        return encode(self.render(messages, add_generation_prompt=True)) or [tokenizer.EOT_ID]

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """A whole conversation's token ids and their marks (LEARN, MESSAGE, SYSTEM, ASSISTANT)."""
        full = self.render(messages)
        ids = encode(full)
        _, offsets = tokenizer.get_encoding().decode_with_offsets(ids)
        starts = np.asarray(offsets, dtype=np.int64)
        marks = np.zeros(len(ids), dtype=np.uint8)

        def first_token(char: int) -> int:
            return int(np.searchsorted(starts, char, side="left"))

        before = ""
        for i, message in enumerate(messages):
            at = first_token(len(before))
            if at < len(ids):
                marks[at] |= MESSAGE | (ASSISTANT if message["role"] == "assistant" else 0)
            upto = self.render(messages[: i + 1])
            self._check_prefix(upto, full, f"messages[:{i + 1}]")
            if message["role"] == "assistant":
                asked = self.render(messages[:i], add_generation_prompt=True)
                self._check_prefix(asked, upto, f"messages[:{i}] with the generation prompt")
                if message.get("weight", 1):
                    marks[first_token(len(asked)) : first_token(len(upto))] |= LEARN
            elif message["role"] == "system" and i == 0:
                marks[: first_token(len(upto))] |= SYSTEM
            before = upto
        return ids, marks

    def _check_prefix(self, part: str, whole: str, what: str) -> None:
        if not whole.startswith(part):
            raise DataError(f"{self.origin} renders {what} as text that does not begin the whole conversation, "
                            "so its turns cannot be told apart")


def encode(text: str) -> list[int]:
    """A rendered conversation's ids: as transformers tokenizes it, `<|endoftext|>` is the token."""
    return tokenizer.get_encoding().encode(text, allowed_special={tokenizer.EOT_TOKEN})


def load(path: str | Path) -> ChatTemplate:
    """The template in a file (Jinja text, or a tokenizer_config.json holding "chat_template")."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"chat template file {str(path)!r} not found") from None
    except OSError as exc:
        raise DataError(f"chat template file {path} cannot be read ({(exc.strerror or str(exc)).lower()})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"chat template file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} is not a tokenizer config with a \"chat_template\" string") from None
        if not isinstance(text, str):
            raise DataError(f"{path}: \"chat_template\" must be a string (named templates are not supported)")
    if not text.strip():
        raise DataError(f"chat template file {path} is empty")
    template = ChatTemplate(text, f"chat template {path}")
    try:
        _compiled(text)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    return template


def holds_template(config: Path) -> bool:
    """Whether a tokenizer_config.json has a "chat_template" at all (many have none: GPT-2's
    own), so that only one that does is read, and checked, as a template."""
    try:
        value = json.loads(config.read_bytes())
    except (OSError, ValueError):
        return True  # unreadable: `load` says why
    return not isinstance(value, dict) or "chat_template" in value


def from_record(record: Any, where: str) -> ChatTemplate:
    """adapter.json's "chat_template" (text and sha256), checked."""
    if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
        raise DataError(f"{where}: \"chat_template\" must be an object with a \"text\" string")
    template = ChatTemplate(record["text"], f"the chat template of {where}")
    if record.get("sha256") != template.sha256:
        raise DataError(f"{where}: the chat template's sha256 does not match its text (the file was edited)")
    return template
