"""One diagnostic type for every stage, and one renderer.

A diagnostic is what a person reads when a `.eff` file is wrong: where (a source span),
what (a stable code and a message) and what to do (a hint). Every stage reports through
`Diagnostic`; nothing else reaches the user.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Span:
    """A range of source text. Lines and columns are 1-based; `end_col` is exclusive.

    Spans compare equal to every other span so that AST equality is structural: two
    programs that differ only in layout are the same program (`parse(fmt(x)) == parse(x)`).
    Use `Span.key()` when positions themselves matter.
    """

    file: str = field(compare=False, default="<input>")
    line: int = field(compare=False, default=1)
    col: int = field(compare=False, default=1)
    end_line: int = field(compare=False, default=1)
    end_col: int = field(compare=False, default=1)

    def key(self) -> tuple[str, int, int, int, int]:
        return (self.file, self.line, self.col, self.end_line, self.end_col)

    def to(self, other: "Span") -> "Span":
        """The span from the start of self to the end of other."""
        return Span(self.file, self.line, self.col, other.end_line, other.end_col)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    code: str
    message: str
    span: Span
    hint: str | None = None

    def sort_key(self) -> tuple:
        return (self.span.file, self.span.line, self.span.col, self.code, self.message)

    def to_json(self) -> dict:
        s = self.span
        return {
            "severity": self.severity.value,
            "code": self.code,
            "message": self.message,
            "file": s.file,
            "line": s.line,
            "col": s.col,
            "end_line": s.end_line,
            "end_col": s.end_col,
            "hint": self.hint,
        }


def error(code: str, message: str, span: Span, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Severity.ERROR, code, message, span, hint)


def warning(code: str, message: str, span: Span, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Severity.WARNING, code, message, span, hint)


def has_errors(diags: Iterable[Diagnostic]) -> bool:
    return any(d.severity is Severity.ERROR for d in diags)


def sort_diagnostics(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Sorted by position, duplicates (same code, span and message) removed."""
    seen: set = set()
    out = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        k = (d.code, d.span.key(), d.message)
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


_COLOURS = {Severity.ERROR: "\x1b[1;31m", Severity.WARNING: "\x1b[1;33m", Severity.NOTE: "\x1b[1;36m"}
_BOLD, _BLUE, _RESET = "\x1b[1m", "\x1b[1;34m", "\x1b[0m"


def render(d: Diagnostic, source: str | None, colour: bool = False) -> str:
    """rustc-style text: location, message, the source line, a caret under the span, hint.

        examples/llama.eff:12:32: error[E0203]: selector matches nothing: 'q_prj'
           12 |     adapt base.layers[*].attn.{q_prj,v} with lora(rank=8)
              |                                ^^^^^
           = hint: did you mean 'q'?
    """
    c = (lambda code, s: f"{code}{s}{_RESET}") if colour else (lambda code, s: s)
    sev = c(_COLOURS[d.severity], f"{d.severity.value}[{d.code}]")
    out = [f"{c(_BOLD, str(d.span))}: {sev}: {c(_BOLD, d.message)}"]
    lines = source.split("\n") if source is not None else []  # the parser's line breaks, exactly
    if 1 <= d.span.line <= len(lines):
        text = lines[d.span.line - 1].rstrip("\r").replace("\t", " ")
        num = str(d.span.line)
        pad = " " * len(num)
        start = max(d.span.col, 1)
        # A multi-line span is underlined to the end of its first line.
        end = d.span.end_col if d.span.end_line == d.span.line else len(text) + 1
        width = max(end - start, 1)
        out.append(f"{c(_BLUE, f'   {num} |')} {text}")
        out.append(f"{c(_BLUE, f'   {pad} |')} {' ' * (start - 1)}{c(_COLOURS[d.severity], '^' * width)}")
        gutter = f"   {pad} ="
    else:
        gutter = "   ="
    if d.hint:
        out.append(f"{c(_BLUE, gutter)} hint: {d.hint}")
    return "\n".join(out)


def render_all(diags: Iterable[Diagnostic], sources: dict[str, str], colour: bool = False) -> str:
    diags = list(diags)
    parts = [render(d, sources.get(d.span.file), colour) for d in diags]
    n_err = sum(d.severity is Severity.ERROR for d in diags)
    n_warn = sum(d.severity is Severity.WARNING for d in diags)
    if diags:
        summary = []
        if n_err:
            summary.append(f"{n_err} error{'s' * (n_err != 1)}")
        if n_warn:
            summary.append(f"{n_warn} warning{'s' * (n_warn != 1)}")
        parts.append(", ".join(summary))
    return "\n\n".join(parts)


def to_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in diags], indent=2)
