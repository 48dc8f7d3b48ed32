"""A completion's text as tokens arrive: valid UTF-8 pieces, cut at the first stop string.

While a stop string could still be completing, the text that might belong to it is held back,
so a streamed client never sees part of a stop string.
"""

from __future__ import annotations

import codecs

from .. import tokenizer


class ChoiceText:
    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
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
