#!/usr/bin/env python3
"""Tiny Shakespeare as prompt/completion pairs: given who speaks (and the line before), the speech.

    python scripts/shakespeare_to_jsonl.py data/tinyshakespeare/input.txt data/shakespeare-speeches
    lora-gpt2 train --data data/shakespeare-speeches --out out/speeches
    lora-gpt2 generate "ROMEO:" --adapter out/speeches

Each speech of the play (a block that starts with "NAME:") becomes one JSONL line:
  prompt     = the last line of the previous speech, a blank line, then "NAME:"
  completion = the speech itself, starting on the next line
so the loss is taken on the speech only (--mask-prompt is on for prompt/completion data) and
`generate "ROMEO:"` continues a prompt shaped as training saw it, stopping at the speech's end.
The last 10% of the speeches (in play order, as nanoGPT splits the text) go to valid.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]*(?: [A-Z][A-Za-z']*)*):$")
VAL_FRACTION = 0.1


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) for every block that starts with a speaker line."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        match = SPEAKER.match(lines[0].strip())
        if match and len(lines) > 1:
            found.append((match.group(1), "\n".join(lines[1:])))
    return found


def pairs(text: str) -> list[dict[str, str]]:
    found = speeches(text)
    result = []
    for i, (speaker, speech) in enumerate(found):
        before = found[i - 1][1].split("\n")[-1] + "\n\n" if i else ""
        result.append({"prompt": f"{before}{speaker}:", "completion": f"\n{speech}\n"})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", type=Path, help="Tiny Shakespeare's input.txt")
    parser.add_argument("out", type=Path, help="folder for train.jsonl and valid.jsonl")
    args = parser.parse_args(argv)
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"shakespeare_to_jsonl: cannot read {args.text}: {exc}", file=sys.stderr)
        return 1
    examples = pairs(text)
    if len(examples) < 2:
        print(f"shakespeare_to_jsonl: {args.text} holds {len(examples)} speeches; need at least 2", file=sys.stderr)
        return 1
    cut = len(examples) - max(1, round(len(examples) * VAL_FRACTION))
    from lora_gpt2.atomic import write_text

    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", examples[:cut]), ("valid.jsonl", examples[cut:])):
        write_text(args.out / name, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in part))
    print(f"{len(examples):,} speeches: {cut:,} in {args.out / 'train.jsonl'}, "
          f"{len(examples) - cut:,} in {args.out / 'valid.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
