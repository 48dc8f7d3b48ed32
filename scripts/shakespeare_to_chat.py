#!/usr/bin/env python3
"""Tiny Shakespeare's dialogue as conversations: one speaker asks, the other answers in character.

    python scripts/shakespeare_to_chat.py data/tinyshakespeare/input.txt data/shakespeare-chat
    lora-gpt2 train --data data/shakespeare-chat --out out/chat --block-size 256
    lora-gpt2 chat --adapter out/chat

Where two speakers take turns, up to `--turns` exchanges become one conversation in OpenAI's
fine-tuning format:
  system    = "You are NAME. Answer in Shakespeare's verse."  (NAME: who answers)
  user      = the other speaker's speech
  assistant = NAME's reply
so the loss is on NAME's replies only (--train-on assistant is the default for chat data). A
conversation always ends with NAME's reply; a third speaker ends it. The last 10% of the
conversations (in play order, as nanoGPT splits the text) go to valid.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shakespeare_to_jsonl import VAL_FRACTION, speeches


def conversations(text: str, turns: int = 3) -> list[dict]:
    found = speeches(text)
    result, i = [], 0
    while i + 1 < len(found):
        asker, answerer = found[i][0], found[i + 1][0]
        if asker == answerer:
            i += 1
            continue
        messages = [{"role": "system", "content": f"You are {answerer.title()}. Answer in Shakespeare's verse."}]
        j = i
        while j + 1 < len(found) and len(messages) < 1 + 2 * turns and \
                (found[j][0], found[j + 1][0]) == (asker, answerer):
            messages += [{"role": "user", "content": found[j][1]}, {"role": "assistant", "content": found[j + 1][1]}]
            j += 2
        result.append({"messages": messages})
        i = j
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", type=Path, help="Tiny Shakespeare's input.txt")
    parser.add_argument("out", type=Path, help="folder for train.jsonl and valid.jsonl")
    parser.add_argument("--turns", type=int, default=3, help="most exchanges in one conversation (default 3)")
    args = parser.parse_args(argv)
    if args.turns < 1:
        print(f"shakespeare_to_chat: --turns must be >= 1, got {args.turns}", file=sys.stderr)
        return 1
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"shakespeare_to_chat: cannot read {args.text}: {exc}", file=sys.stderr)
        return 1
    talks = conversations(text, args.turns)
    if len(talks) < 2:
        print(f"shakespeare_to_chat: {args.text} holds {len(talks)} exchanges; need at least 2", file=sys.stderr)
        return 1
    cut = len(talks) - max(1, round(len(talks) * VAL_FRACTION))
    from lora_gpt2.atomic import write_text

    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", talks[:cut]), ("valid.jsonl", talks[cut:])):
        write_text(args.out / name, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in part))
    answers = sum(len(t["messages"]) // 2 for t in talks)
    print(f"{len(talks):,} conversations ({answers:,} answers): {cut:,} in {args.out / 'train.jsonl'}, "
          f"{len(talks) - cut:,} in {args.out / 'valid.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
