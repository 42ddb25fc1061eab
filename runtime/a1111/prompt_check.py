"""Strict check of A1111 prompt syntax: names what A1111 would silently read as something else.

References (AUTOMATIC1111/stable-diffusion-webui):
- modules/prompt_parser.py, re_attention: a weight is `:` + `[+-]?[.\\d]+` + `)` with no spaces; `(a:b)`,
  `(a: 1.2)` and an unclosed `(a:` are read as text weighted 1.1, without a warning.
- parse_prompt_attention: BREAK inside brackets has its -1 marker multiplied, so tokenize_line
  (modules/sd_hijack_clip.py) no longer sees a break and encodes the word BREAK instead.
- schedule_parser (lark grammar): `[a:b:N]`, `[b:N]` and `[a|b]` are prompt editing, and re_AND splits
  `a AND b` into composable prompts; the runtime does not implement those yet, so they are reported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UserError
from .prompt_parser import BREAK_RE, Token, not_a_number, snippet, tokens, weight_value

NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?|\d*\.\d+)")                       # re_weight's number
EDIT_END_RE = re.compile(r":\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")   # lark SIGNED_NUMBER
AND_RE = re.compile(r"\bAND\b")


@dataclass
class _Open:
    """A bracket still open while scanning: where it starts and, for "(", its first literal colon."""
    start: int
    colon: int | None = None


@dataclass
class _Scan:
    """Bracket stacks of one scan, kept apart like A1111's, and the problems found so far."""
    prompt: str
    rounds: list[_Open] = field(default_factory=list)
    squares: list[_Open] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def innermost(self) -> _Open | None:
        """The most recently opened bracket of either kind."""
        return max(self.rounds[-1:] + self.squares[-1:], key=lambda o: o.start, default=None)

    def close_round(self, end: int) -> None:
        """A plain ")" closes a "(": a colon inside it means a weight A1111 did not read."""
        opened = self.rounds.pop()
        if opened.colon is None:
            return
        weight, shown = self.prompt[opened.colon + 1:end - 1], snippet(self.prompt, opened.start, end)
        if NUMBER_RE.fullmatch(weight.strip()):
            self.problems.append(f"weight {weight!r} in {shown!r} has spaces, which A1111 reads as text; "
                                 f"write it as ':{weight.strip()})'")
        else:
            self.problems.append(not_a_number(weight, self.prompt, opened.start, end))

    def close_square(self, end: int) -> None:
        """A "]" closes a "[": `[a:b:N]` and `[a|b]` are prompt editing."""
        opened = self.squares.pop()
        inner = self.prompt[opened.start + 1:end - 1]
        if EDIT_END_RE.search(inner) or "|" in inner:
            self.problems.append(f"prompt editing {snippet(self.prompt, opened.start, end)!r} is not supported")

    def close_weight(self, tok: Token) -> None:
        """A `:w)` closes a "(": the number must be one float() reads."""
        opened = self.rounds.pop()
        if weight_value(tok) is None:
            self.problems.append(not_a_number(tok.weight, self.prompt, opened.start, tok.end))

    def text(self, tok: Token) -> None:
        """Plain text: a colon right inside "(" starts a weight; BREAK inside any bracket is misread."""
        inner = self.innermost()
        if tok.text == ":" and self.rounds and inner is self.rounds[-1] and inner.colon is None:
            inner.colon = tok.start
        found = BREAK_RE.search(tok.text) if inner is not None else None
        if found:
            shown = snippet(self.prompt, inner.start, tok.start + found.end()).strip()
            self.problems.append(f"BREAK inside brackets in {shown!r} is read as the word BREAK, not a chunk break")


def find_problems(prompt: str) -> list[str]:
    """Every A1111 syntax problem in prompt, each as one line (empty when the prompt reads as written)."""
    scan = _Scan(prompt)
    for tok in tokens(prompt):
        if tok.kind == "open":
            (scan.rounds if tok.text == "(" else scan.squares).append(_Open(tok.start))
        elif tok.kind == "weight" and scan.rounds:
            scan.close_weight(tok)
        elif tok.text == ")" and scan.rounds:
            scan.close_round(tok.end)
        elif tok.text == "]" and scan.squares:
            scan.close_square(tok.end)
        elif tok.kind != "escape":
            scan.text(tok)
    for opened in scan.rounds:
        if opened.colon is not None:
            scan.problems.append(f"{snippet(prompt, opened.start, len(prompt))!r} opens a weight "
                                 "that is never closed with ')'")
    if AND_RE.search(prompt):
        scan.problems.append("AND (composable prompts) is not supported")
    return scan.problems


def check_prompt(prompt: str, label: str = "prompt") -> None:
    """Raise a one-line UserError for the first problem find_problems reports, prefixed with label."""
    problems = find_problems(prompt)
    if problems:
        raise UserError(f"{label}: {problems[0]}")
