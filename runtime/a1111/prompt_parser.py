"""AUTOMATIC1111 attention syntax: a prompt -> runs of (text, weight), with BREAK markers.

References (AUTOMATIC1111/stable-diffusion-webui, modules/prompt_parser.py, parse_prompt_attention):
- `(x)` multiplies x's weight by 1.1, `[x]` by 1/1.1, `(x:w)` by w; brackets nest by multiplying.
- `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; any other backslash is dropped.
- A closing bracket with nothing open is literal text; a bracket never closed applies its multiplier to the
  rest of the prompt (round ones first, then square ones, outermost first).
- `:` is literal unless it starts `:<digits and dots>)` closing an open `(`; `(a:` and `(a:b)` are text
  weighted 1.1. A weight such as `1.2.3` makes float() fail there; here it is a one-line UserError.
- `BREAK` (a whole word in plain text) becomes the marker ("BREAK", -1); brackets around it multiply that
  -1 too, after which it is read as the word BREAK (see prompt_check).
- Adjacent runs of equal weight are merged; a prompt with no runs is [("", 1.0)].
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)

TOKEN_RE = re.compile(r"""
    \\[()\[\]\\]                    # escaped bracket or backslash: the character itself
  | \\                              # any other backslash: dropped
  | [(\[]                           # opening bracket
  | :(?P<weight>[+-]?[.\d]+)\)      # explicit weight closing a round bracket
  | [)\]]                           # closing bracket
  | [^\\()\[\]:]+                   # plain text
  | :                               # a colon that is not a weight
""", re.X)
BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Token:
    """One lexical piece of a prompt: kind is escape, open, weight, close or text; span indexes the prompt."""
    kind: str
    text: str
    start: int
    end: int
    weight: str | None = None


def tokens(prompt: str) -> Iterator[Token]:
    """Split a prompt into the pieces A1111's attention regex matches, in order."""
    for m in TOKEN_RE.finditer(prompt):
        piece = m.group(0)
        if piece.startswith("\\"):
            kind = "escape"
        elif piece in "([":
            kind = "open"
        elif m.group("weight") is not None:
            kind = "weight"
        elif piece in ")]":
            kind = "close"
        else:
            kind = "text"
        yield Token(kind, piece, m.start(), m.end(), m.group("weight"))


def weight_value(token: Token) -> float | None:
    """The number of a `:w)` token; None when float() refuses it (`1.2.3`, `.`)."""
    try:
        return float(token.weight)
    except ValueError:
        return None


def not_a_number(weight: str, prompt: str, start: int, end: int) -> str:
    """The one-line complaint about a weight that is not a number, quoting its brackets."""
    return f"weight {weight!r} in {snippet(prompt, start, end)!r} is not a number"


def snippet(prompt: str, start: int, end: int, limit: int = 60) -> str:
    """prompt[start:end], shortened in the middle to about limit characters."""
    text = prompt[start:end]
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-(limit // 2):]


def is_break(item: tuple[str, float]) -> bool:
    """True for the BREAK marker run ("BREAK", -1)."""
    return item[0] == BREAK[0] and item[1] == BREAK[1]


def _merge(runs: list[list]) -> list[tuple[str, float]]:
    """Join neighbouring runs of equal weight; [("", 1.0)] when there are none."""
    merged: list[list] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def parse_prompt_attention(prompt: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention: runs of (text, weight), BREAK as ("BREAK", -1), equal weights merged."""
    runs: list[list] = []                     # [text, weight], mutable while brackets close
    rounds: list[tuple[int, int]] = []        # (index into runs, offset in prompt) per open "("
    squares: list[int] = []                   # index into runs per open "["

    def scale(first: int, factor: float) -> None:
        for run in runs[first:]:
            run[1] *= factor

    for tok in tokens(prompt):
        if tok.kind == "escape":
            runs.append([tok.text[1:], 1.0])
        elif tok.text == "(" and tok.kind == "open":
            rounds.append((len(runs), tok.start))
        elif tok.kind == "open":
            squares.append(len(runs))
        elif tok.kind == "weight" and rounds:
            first, opened = rounds.pop()
            value = weight_value(tok)
            if value is None:                 # A1111 raises ValueError here
                raise UserError("prompt: " + not_a_number(tok.weight, prompt, opened, tok.end))
            scale(first, value)
        elif tok.text == ")" and rounds:
            scale(rounds.pop()[0], ROUND_MULTIPLIER)
        elif tok.text == "]" and squares:
            scale(squares.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(BREAK_RE.split(tok.text)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for first, _ in rounds:
        scale(first, ROUND_MULTIPLIER)
    for first in squares:
        scale(first, SQUARE_MULTIPLIER)
    return _merge(runs)
