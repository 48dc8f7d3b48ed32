"""Tokens to text as they arrive: valid UTF-8 pieces, cut at the first stop string.

The one incremental decoder of lora-gpt2: `generate`'s stdout and the server's choices read it.
Bytes of a character split across tokens wait for the rest, so every piece is valid text. While
a stop string could still be completing, the text that might belong to it is held back, so a
streamed client never sees part of a stop string.
"""

from __future__ import annotations

import codecs
from typing import Iterator

from .. import tokenizer


class TextDecoder:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.stops = list(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded so far
        self._sent = 0  # characters already handed out
        self.stopped = False  # a stop string was found: the completion ends there

    def add(self, token: int) -> str:
        """The new text this token makes safe to show ('' while held back)."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(tokenizer.get_encoding().decode_single_token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, once no more tokens come."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self._text.find(s, max(0, self._sent - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(self._text)
        else:  # keep back what could be the start of a stop string
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self._sent, len(self._text) - hold)
        piece = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        return piece

    @property
    def text(self) -> str:
        return self._text[: self._sent]


class TextStream:
    """Text pieces of one completion as it is generated; `tokens` and `finish_reason` once done."""

    def __init__(self, tokens: Iterator[int], max_new_tokens: int) -> None:
        self._tokens = tokens
        self._max = max_new_tokens
        self._text = TextDecoder()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "length" or "stop"

    def __iter__(self) -> Iterator[str]:
        for token in self._tokens:
            self.tokens.append(token)
            piece = self._text.add(token)
            if piece:
                yield piece
        rest = self._text.finish()
        if rest:
            yield rest
        self.finish_reason = "length" if len(self.tokens) == self._max else "stop"
