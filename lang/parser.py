"""`.eff` text -> typed AST, or diagnostics.

`parse(text, path)` never raises on bad input: every Lark error is converted here, at the
parse boundary, into a `Diagnostic` with a readable expectation. After a syntax error
the offending logical line is replaced by a neutral statement and parsing resumes, so one
run reports the syntax errors of many lines, not just the first.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import Indenter

from effc.lang import ast
from effc.lang.diagnostics import Diagnostic, Span, error

MAX_DEPTH = 100  # tree levels; keeps every recursive walk far below Python's stack limit
MAX_SYNTAX_ERRORS = 50

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def size_bytes(text: str) -> int | None:
    """A size written as in the language (`8GiB`, `1.5GB`, `512MiB`) in bytes; None if
    the text is not one."""
    m = re.fullmatch(r"\s*([0-9]+\.?[0-9]*)(KiB|MiB|GiB|TiB|KB|MB|GB|TB|B)\s*", text)
    return int(round(float(m.group(1)) * UNITS[m.group(2)])) if m else None


class _LayoutError(Exception):
    def __init__(self, code: str, message: str, line: int, col: int, hint: str):
        super().__init__(message)
        self.code, self.message, self.line, self.col, self.hint = code, message, line, col, hint


class _EffIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB", "LBRACE"]
    CLOSE_PAREN_types = ["RPAR", "RSQB", "RBRACE"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 1  # tabs are reported (E0003) and replaced by one space before parsing

    def __init__(self) -> None:
        super().__init__()
        self.history: list[Token] = []

    def handle_NL(self, token: Token):
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1]
        indent = len(indent_str)
        line = token.end_line
        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield Token.new_borrow_pos(self.INDENT_type, indent_str, token)
        else:
            levels = list(self.indent_level)
            while indent < self.indent_level[-1]:
                self.indent_level.pop()
                yield Token.new_borrow_pos(self.DEDENT_type, indent_str, token)
            if indent != self.indent_level[-1]:
                raise _LayoutError(
                    "E0004", "indentation does not match any enclosing block", line, 1,
                    "indent it like an enclosing block: "
                    + " or ".join(f"{n} spaces" for n in levels if n < indent or n == levels[-1]))

    def process(self, stream):
        self.history = []
        self.open_brackets: list[Token] = []
        for tok in super().process(stream):
            self.history.append(tok)
            if len(self.history) > 4:
                del self.history[0]
            if tok.type in self.OPEN_PAREN_types:
                self.open_brackets.append(tok)
            elif tok.type in self.CLOSE_PAREN_types and self.open_brackets:
                self.open_brackets.pop()
            yield tok


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("effc.lang").joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", strict=True, propagate_positions=True,
                maybe_placeholders=True, postlex=_EffIndenter())


def keywords() -> list[str]:
    """The keywords of the language, read from the grammar. (The contextual lexer lets a
    keyword serve as a name wherever only a name can stand: `(model=1)`, `stage train:`.)"""
    out = set()
    for t in _parser().terminals:
        if t.pattern.type == "str" and re.fullmatch(r"[a-z_]+", t.pattern.value):
            out.add(t.pattern.value)
    return sorted(out)


# ---------------------------------------------------------------- source preparation


def _normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text if text.endswith("\n") else text + "\n"


def _scan_line(line: str) -> tuple[int, int | None]:
    """(bracket depth change, column index of a comment '#' or None), strings skipped."""
    depth, i, n = 0, 0, len(line)
    while i < n:
        ch = line[i]
        if ch == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
        elif ch == "#":
            return depth, i
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        i += 1
    return depth, None


def _code(line: str) -> str:
    """The line without its comment."""
    at = _scan_line(line)[1]
    return line if at is None else line[:at]


def _comments(lines: list[str], path: str) -> tuple[ast.Comment, ...]:
    out = []
    for no, line in enumerate(lines, 1):
        _, at = _scan_line(line)
        if at is not None:
            text = line[at:].rstrip()
            out.append(ast.Comment(text, line[:at].strip() == "",
                                   Span(path, no, at + 1, no, at + 1 + len(text))))
    return tuple(out)


_STARTERS = frozenset({"pipeline", "param", "model", "data", "budget", "stage", "train", "eval",
                       "adapt", "share", "tie", "prune", "quantize", "export"})


def _logical_line(lines: list[str], lineno: int) -> tuple[int, int]:
    """The physical lines (1-based, inclusive) of the logical line holding `lineno`:
    a line continues while a bracket opened on it is still open, unless the next line
    starts a statement at the same or a lower indentation (the bracket was never closed)."""
    start, depth = None, 0
    for no, line in enumerate(lines, 1):
        code = _code(line)
        first = re.match(r"\s*([a-z_]+)", code)
        restart = (depth > 0 and start is not None and first is not None
                   and first.group(1) in _STARTERS and _indent(code) <= _indent(lines[start - 1]))
        if (depth <= 0 and code.strip()) or restart:
            if restart and no > lineno:  # the unclosed line ends where the next statement starts
                return start, no - 1
            start, depth = no, 0
        d, _ = _scan_line(line)
        depth += d
        if no >= lineno and start is not None and depth <= 0:
            return start, no
    return (start or lineno), len(lines)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank_block(lines: list[str], first: int, last: int, deeper_than: int) -> None:
    """Blank lines first..last, then the lines after them indented deeper than
    `deeper_than` (the body of a block whose header was wrong)."""
    for no in range(first, last + 1):
        lines[no - 1] = ""
    no = last + 1
    while no <= len(lines):
        code = lines[no - 1]
        stripped = _code(code).strip()
        if stripped and _indent(code) <= deeper_than:
            break
        lines[no - 1] = ""
        no += 1


# ---------------------------------------------------------------- error conversion

_TOKEN_WORDS = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "SIZE": "a size such as 4GiB",
    "STRING": "a string", "_NL": "the end of the line", "_INDENT": "an indented block",
    "_DEDENT": "the end of the block", "$END": "the end of the file",
}
_AFTER_KEYWORD = {
    "adapt": "a selector", "prune": "a selector", "quantize": "a selector",
    "share": "a selector", "tie": "a selector", "train": "a model name",
    "eval": "a model name", "export": "a model name", "on": "a data name",
    "pipeline": "a pipeline name", "param": "a param name", "model": "a model name",
    "data": "a data name", "stage": "a stage name",
}


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type == "_NL":
        return "the end of the line"
    if tok.type == "_INDENT":
        return "an indented line"
    if tok.type == "_DEDENT":
        return "the end of the block"
    return f"'{tok.value}'"


def _describe_expected(names: set[str]) -> str:
    terms = {t.name: t for t in _parser().terminals}
    words = []
    for name in sorted(names):
        if name in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[name])
        elif name in terms and terms[name].pattern.type == "str":
            words.append(f"'{terms[name].pattern.value}'")
        else:
            words.append(name.lower())
    words = sorted(set(words))
    if len(words) > 6:
        words = words[:6] + ["..."]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _token_span(path: str, tok: Token) -> Span:
    line, col = tok.line or 1, tok.column or 1
    end_line, end_col = tok.end_line or line, tok.end_column or col + 1
    if tok.type in ("_NL", "_INDENT", "_DEDENT", "$END") or end_line != line:
        end_line, end_col = line, col + 1
    return Span(path, line, col, end_line, max(end_col, col + 1))


def _convert(e: BaseException, path: str, lines: list[str], history: list[Token],
             open_brackets: list[Token]) -> Diagnostic:
    if isinstance(e, _LayoutError):
        width = len(lines[e.line - 1]) - len(lines[e.line - 1].lstrip(" ")) if e.line <= len(lines) else 0
        return error(e.code, e.message, Span(path, e.line, 1, e.line, max(width, 1) + 1), e.hint)
    if isinstance(e, UnexpectedCharacters):
        span = Span(path, e.line, e.column, e.line, e.column + 1)
        ch = lines[e.line - 1][e.column - 1] if e.line <= len(lines) and e.column <= len(lines[e.line - 1]) else "?"
        if ch == '"':
            return error("E0007", "string is not closed on this line", span,
                         'close it with " before the end of the line; strings cannot span lines')
        if ch == "'":
            return error("E0001", "unexpected character \"'\"", span, 'strings are written in double quotes: "..."')
        return error("E0001", f"unexpected character '{ch}'", span,
                     f"expected {_describe_expected(set(e.allowed or ()))}")
    if isinstance(e, UnexpectedToken):
        tok = e.token
        same = lambda a, b: (a.type, a.value, a.line, a.column) == (b.type, b.value, b.line, b.column)  # noqa: E731
        i = next((i for i, t in enumerate(history) if same(t, tok)), -1)
        if i < 0:  # raised by the contextual lexer before the token reached the history
            i = len(history)
        prev = history[i - 1] if i >= 1 else None
        pprev = history[i - 2] if i >= 2 else None
        expected = set(e.expected or ())
        span = _token_span(path, tok)
        closers = {"RPAR": ")", "RSQB": "]", "RBRACE": "}"}
        if open_brackets and expected & set(closers) and (tok.type == "$END" or tok.line > open_brackets[-1].line):
            ob = open_brackets[-1]
            close = {"(": ")", "[": "]", "{": "}"}[ob.value]
            return error("E0008", f"'{ob.value}' is never closed", _token_span(path, ob),
                         f"add '{close}' where the list ends, before {_describe_token(tok)} on line {tok.line}")
        if prev is not None and prev.type == "_NL" and pprev is not None and pprev.type == "COLON":
            span = Span(path, prev.line, prev.column, prev.line, prev.column + 1)
            return error("E0011", "expected an indented block of statements after this line", span,
                         "indent the statements of the stage under its header")
        if tok.type == "$END":
            return error("E0002", "unexpected end of file", span,
                         f"expected {_describe_expected(expected)}; is a bracket left open?")
        if tok.type == "_INDENT":
            span = Span(path, tok.end_line, 1, tok.end_line, max(tok.end_column, 2))
            return error("E0005", "unexpected indentation", span,
                         "only the statements of a stage are indented; remove the leading spaces")
        if tok.value in ("train", "eval", "adapt", "share", "tie", "prune", "quantize") and "STAGE" in expected:
            return error("E0009", f"'{tok.value}' is a stage statement, found outside a stage", span,
                         "put it in a 'stage NAME:' block, indented under the header")
        what = None
        if (prev is not None and prev.type == "NAME" and prev.value in keywords()
                and pprev is not None and pprev.value in _AFTER_KEYWORD):
            return error("E0001", f"expected {_AFTER_KEYWORD[pprev.value]} after '{pprev.value}', "
                         f"found the keyword '{prev.value}'", _token_span(path, prev), None)
        if tok.type == "NAME" and prev is not None and prev.type in ("INT", "FLOAT") and prev.end_line == tok.line:
            unit = next((u for u in UNITS if u.lower() == tok.value.lower()), None)
            if unit is not None:
                glued = prev.end_column == tok.column
                if glued and tok.value == unit:  # '1e3GiB': the number part has an exponent
                    return error("E0001", "a size is digits and a unit", _token_span(path, prev).to(span),
                                 "write it like 4GiB or 1.5GiB; exponents are not allowed in sizes")
                return error("E0001", f"'{tok.value}' is not a size unit" if glued else
                             "a size is written without a space", _token_span(path, prev).to(span),
                             f"write {prev.value}{unit}; units are {', '.join(UNITS)}")
        if prev is not None and prev.value == "to" and "STRING" in expected:
            return error("E0001", f"expected a path in double quotes after 'to', found {_describe_token(tok)}",
                         span, 'write the folder as a string: "out/model"')
        if (tok.type == "NAME" and "COMMA" in expected and prev is not None and prev.type != "COMMA"
                and open_brackets):
            return error("E0001", f"expected ',' before '{tok.value}'", span,
                         "separate options and arguments with commas")
        if prev is not None and prev.type != "NAME" and prev.value in _AFTER_KEYWORD and "NAME" in expected:
            what = f"{_AFTER_KEYWORD[prev.value]} after '{prev.value}'"
        elif prev is not None and prev.value in ("with", "as", "to") and "NAME" in expected and "STRING" not in expected:
            what = f"a technique call such as lora(rank=8) after '{prev.value}'"
        if what is None:
            what = _describe_expected(expected)
        return error("E0001", f"expected {what}, found {_describe_token(tok)}", span,
                     _syntax_hint(tok, expected, bool(open_brackets), lines))
    if isinstance(e, UnexpectedEOF):
        last = len(lines)
        return error("E0002", "unexpected end of file", Span(path, last, 1, last, 2),
                     f"expected {_describe_expected(set(e.expected or ()))}")
    raise e


_TEMPLATES = {
    "train": "train MODEL on DATA (steps=..., ...)", "eval": "eval MODEL on DATA (metrics=[...])",
    "adapt": "adapt SELECTOR with TECHNIQUE(...)", "share": "share SELECTOR as TECHNIQUE(...)",
    "tie": "tie SELECTOR with SELECTOR", "prune": "prune SELECTOR with METHOD(...)",
    "quantize": "quantize SELECTOR to SCHEME(...)", "export": 'export MODEL to "path" (format=...)',
    "param": "param NAME = VALUE", "model": "model NAME = FAMILY(...)", "data": "data NAME = SOURCE(...)",
    "budget": "budget(memory=4GiB)", "stage": "stage NAME:", "pipeline": "pipeline NAME",
}


def _syntax_hint(tok: Token, expected: set[str], in_brackets: bool, lines: list[str]) -> str | None:
    if tok.type == "COLON" and in_brackets:
        return "arguments are written name=value"
    if "LPAR" in expected and tok.type == "NAME":
        return "options are written in parentheses: (key=value, ...)"
    if tok.type == "_NL" and "RPAR" in expected:
        return "an option list needs its closing ')'"
    if tok.type == "EQUAL" and "COLON" not in expected:
        return "options are written key=value inside parentheses after the statement"
    if "COLON" in expected and tok.type == "_NL":
        return "a stage header ends with ':'"
    if tok.type == "COLON" and "_NL" in expected:
        return "only 'stage NAME:' opens a block"
    line = lines[tok.line - 1] if tok.line and tok.line <= len(lines) else ""
    first = line.split()[0] if line.split() else ""
    if first in _TEMPLATES and not in_brackets:
        return f"the form is: {_TEMPLATES[first]}"
    return None


# ---------------------------------------------------------------- tree -> AST


def _tree_depth_violation(tree: Tree) -> Tree | None:
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return node
        for child in node.children:
            if isinstance(child, Tree):
                stack.append((child, depth + 1))
    return None


MAX_DIGITS = 30  # integers beyond 10**30 mean nothing in a pipeline and slow everything down


def _number_out_of_range(tree: Tree, path: str) -> Diagnostic | None:
    """A number literal that would not convert to a finite value (E0012)."""
    for tok in tree.scan_values(lambda t: isinstance(t, Token) and t.type in ("INT", "FLOAT", "SIZE")):
        digits = re.match(r"[0-9.]*", tok.value).group(0)
        mantissa = digits if tok.type != "FLOAT" else tok.value
        too_big = len(digits.split(".")[0]) > MAX_DIGITS
        if not too_big and tok.type != "INT":
            scale = UNITS[tok.value[len(digits):]] if tok.type == "SIZE" else 1
            too_big = not math.isfinite(float(mantissa) * scale)
        if too_big:
            span = Span(path, tok.line, tok.column, tok.end_line, tok.end_column)
            return error("E0012", "number is too large", span,
                         f"numbers are limited to {MAX_DIGITS} digits and to finite floating-point values")
    return None


class _ToAst(Transformer):
    def __init__(self, path: str, lines: list[str]):
        super().__init__()
        self.path = path
        self.lines = lines
        self.codes = [_code(line) for line in lines]  # once per line: _span runs per node

    def _span(self, meta) -> Span:
        """The rule's span, its end pulled back over the newline, blank lines and
        comments that Lark counts as part of a statement."""
        line, col = meta.end_line, meta.end_column
        code = self.codes[line - 1] if line <= len(self.codes) else ""
        if 2 <= col <= len(code) + 1 and not code[col - 2].isspace():
            return Span(self.path, meta.line, meta.column, line, col)  # the usual case: ends on code
        while line > meta.line or (line == meta.line and col > meta.column):
            code = (self.codes[line - 1] if line <= len(self.codes) else "")[: col - 1].rstrip()
            if code:
                col = len(code) + 1
                break
            line -= 1
            col = len(self.lines[line - 1]) + 1 if line >= 1 else 1
        return Span(self.path, meta.line, meta.column, line, col)

    def _tok(self, tok: Token) -> Span:
        return Span(self.path, tok.line, tok.column, tok.end_line, tok.end_column)

    def _ident(self, tok: Token | None) -> ast.Ident | None:
        return None if tok is None else ast.Ident(str(tok), self._tok(tok))

    # values
    @v_args(meta=True)
    def int(self, meta, c):
        return ast.Int(int(c[0]), self._span(meta))

    @v_args(meta=True)
    def float(self, meta, c):
        return ast.Float(float(c[0]), str(c[0]), self._span(meta))

    @v_args(meta=True)
    def size(self, meta, c):
        m = re.fullmatch(r"([0-9.]+)([A-Za-z]+)", str(c[0]))
        return ast.Size(int(round(float(m.group(1)) * UNITS[m.group(2)])), str(c[0]), self._span(meta))

    def _string(self, tok: Token) -> ast.Str:
        value = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), str(tok)[1:-1])
        return ast.Str(value, self._tok(tok))

    def string(self, c):
        return self._string(c[0])

    @v_args(meta=True)
    def true(self, meta, c):
        return ast.Bool(True, self._span(meta))

    @v_args(meta=True)
    def false(self, meta, c):
        return ast.Bool(False, self._span(meta))

    @v_args(meta=True)
    def name(self, meta, c):
        return ast.Name(str(c[0]), self._span(meta))

    @v_args(meta=True)
    def attr(self, meta, c):
        return ast.Attr(self._ident(c[0]), self._ident(c[1]), self._span(meta))

    @v_args(meta=True)
    def snapshot(self, meta, c):
        return ast.Snapshot(self._ident(c[0]), self._ident(c[1]), self._span(meta))

    @v_args(meta=True)
    def call(self, meta, c):
        args = tuple(a for a in c[1:] if a is not None)
        return ast.Call(self._ident(c[0]), args, self._span(meta))

    @v_args(meta=True)
    def list(self, meta, c):
        return ast.List(tuple(x for x in c if x is not None), self._span(meta))

    def _binop(op):  # noqa: N805 - a small factory for the four operators
        @v_args(meta=True)
        def make(self, meta, c):
            return ast.BinOp(op, c[0], c[1], self._span(meta))
        return make

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    @v_args(meta=True)
    def neg(self, meta, c):
        return ast.Neg(c[0], self._span(meta))

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ast.KwArg(self._ident(c[0]), c[1], self._span(meta))

    def options(self, c):
        return tuple(x for x in c if x is not None)

    # selectors
    @v_args(meta=True)
    def signed_int(self, meta, c):
        return -int(c[-1]) if len(c) == 1 and meta.column < c[0].column else int(c[0])

    @v_args(meta=True)
    def star(self, meta, c):
        return ast.IndexAll(self._span(meta))

    @v_args(meta=True)
    def slice(self, meta, c):
        return ("slice", c[0], c[1])

    @v_args(meta=True)
    def index(self, meta, c):
        x = c[0]
        if isinstance(x, ast.IndexAll):
            return ast.IndexAll(self._span(meta))
        if isinstance(x, tuple):
            return ast.IndexSlice(x[1], x[2], self._span(meta))
        return ast.IndexAt(x, self._span(meta))

    @v_args(meta=True)
    def field(self, meta, c):
        return ast.Field(self._ident(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def name_set(self, meta, c):
        return ast.NameSet(tuple(self._ident(t) for t in c if t is not None), self._span(meta))

    @v_args(meta=True)
    def any_depth(self, meta, c):
        return ast.AnyDepth(self._span(meta))

    @v_args(meta=True)
    def selector(self, meta, c):
        return ast.Selector(self._ident(c[0]), tuple(c[1:-1]), self._ident(c[-1]), self._span(meta))

    # statements
    @v_args(meta=True)
    def model_ref(self, meta, c):
        return ast.ModelRef(self._ident(c[0]), self._ident(c[1]), self._span(meta))

    @v_args(meta=True)
    def data_ref(self, meta, c):
        return ast.DataRef(self._ident(c[0]), self._ident(c[1]), self._span(meta))

    @v_args(meta=True)
    def train_stmt(self, meta, c):
        return ast.Train(c[0], c[1], c[2] or (), self._span(meta))

    @v_args(meta=True)
    def eval_stmt(self, meta, c):
        return ast.Eval(c[0], c[1], c[2] or (), self._span(meta))

    @v_args(meta=True)
    def adapt_stmt(self, meta, c):
        return ast.Adapt(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def share_stmt(self, meta, c):
        return ast.Share(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def tie_stmt(self, meta, c):
        return ast.Tie(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def prune_stmt(self, meta, c):
        return ast.Prune(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def quantize_stmt(self, meta, c):
        return ast.Quantize(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def export_stmt(self, meta, c):
        return ast.Export(c[0], self._string(c[1]), c[2] or (), self._span(meta))

    # declarations
    @v_args(meta=True)
    def pipeline_decl(self, meta, c):
        return ast.Pipeline(self._ident(c[0]), self._span(meta))

    @v_args(meta=True)
    def param_decl(self, meta, c):
        return ast.Param(self._ident(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def model_decl(self, meta, c):
        return ast.ModelDecl(self._ident(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def data_decl(self, meta, c):
        return ast.DataDecl(self._ident(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def budget_decl(self, meta, c):
        return ast.Budget(c[0], self._span(meta))

    @v_args(meta=True)
    def stage_decl(self, meta, c):
        return ast.Stage(self._ident(c[0]), tuple(c[1:]), self._span(meta))

    def start(self, c):
        return tuple(c)


# ---------------------------------------------------------------- recovery

_PLACEHOLDER = 'export _ to ""'  # valid both at top level and inside a stage


def _recover(lines: list[str], d: Diagnostic, e: BaseException, touched: set[int]) -> bool:
    """Neutralise the lines behind a syntax error so parsing can go on to find the next
    one. Returns False when no progress is possible (the same lines failed again)."""
    if not lines:
        return False
    clamp = lambda n: min(max(n, 1), len(lines))  # noqa: E731
    if d.code == "E0008":  # the open bracket's lines, up to the line that revealed it
        first, last = d.span.line, max(d.span.line, clamp(e.token.line) - 1)
    else:
        first, last = _logical_line(lines, clamp(d.span.line))
        first = min(first, clamp(d.span.line))
    if any(n in touched for n in range(first, last + 1)):
        return False
    touched.update(range(first, last + 1))
    base = _indent(lines[first - 1])
    code = _code(lines[first - 1]).rstrip()
    if d.code in ("E0004", "E0005"):  # the whole wrongly indented block goes
        _blank_block(lines, first, last, base - 1)
        return True
    header = code.endswith(":") or code.lstrip().startswith("stage ")
    _blank_block(lines, first, last, base if header else 10**9)
    if code.strip():
        lines[first - 1] = " " * base + _PLACEHOLDER
    return True


# ---------------------------------------------------------------- entry point


@dataclass(frozen=True)
class ParseResult:
    program: ast.Program | None
    diagnostics: tuple[Diagnostic, ...]
    source: str  # the text as parsed (newlines normalised)


def parse(text: str, path: str = "<input>") -> ParseResult:
    """Parse `.eff` text. On any syntax error `program` is None and the diagnostics say why."""
    text = _normalize(text)
    original = text.split("\n")[:-1]
    diags: list[Diagnostic] = []
    lines = list(original)
    tab_lines: set[int] = set()
    for no, line in enumerate(lines, 1):
        lead = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in lead:
            col = lead.index("\t") + 1
            diags.append(error("E0003", "tab in indentation", Span(path, no, col, no, col + 1),
                               "indent with spaces; tabs are not allowed"))
            tab_lines.add(no)
            lines[no - 1] = lead.replace("\t", " ") + line[len(lead):]
    first_code = next((no for no, line in enumerate(lines, 1) if _code(line).strip()), None)
    if first_code is not None and _indent(lines[first_code - 1]) > 0 and first_code not in tab_lines:
        width = _indent(lines[first_code - 1])
        diags.append(error("E0005", "unexpected indentation", Span(path, first_code, 1, first_code, width + 1),
                           "only the statements of a stage are indented; remove the leading spaces"))
        _blank_block(lines, first_code, first_code, 0)
    touched: set[int] = set()
    tree = None
    parser = _parser()
    indenter: _EffIndenter = parser.options.postlex
    while True:
        try:
            tree = parser.parse("\n".join(lines) + "\n")
            break
        except (UnexpectedInput, _LayoutError) as e:
            d = _convert(e, path, lines, list(indenter.history), list(indenter.open_brackets))
            if not (d.code in ("E0004", "E0005") and d.span.line in tab_lines):
                diags.append(d)  # (a tab already explains a bad indentation on its line)
            if len(diags) >= MAX_SYNTAX_ERRORS or not _recover(lines, d, e, touched):
                break
    comments = _comments(original, path)
    if diags or tree is None:
        return ParseResult(None, tuple(diags), text)
    deep = _tree_depth_violation(tree)
    if deep is not None:
        m = deep.meta
        span = Span(path, m.line, m.column, m.end_line, m.end_column) if not m.empty else Span(path, 1, 1, 1, 2)
        return ParseResult(None, (error("E0006", "expression is nested too deeply", span,
                                        f"effc accepts {MAX_DEPTH} levels of syntax tree (about half as many "
                                        "brackets); split the expression using params"),), text)
    huge = _number_out_of_range(tree, path)
    if huge is not None:
        return ParseResult(None, (huge,), text)
    items = _ToAst(path, lines).transform(tree)
    span = Span(path, 1, 1, len(original) + 1, 1)
    return ParseResult(ast.Program(items, comments, path, span), (), text)
