"""`effc lsp`: the language server, over stdio (pygls).

    effc lsp          # an editor starts it; docs/editors.md shows VS Code and Neovim set-ups

It publishes the checker's diagnostics as the user types, completes statements, technique
names, their arguments and selector paths, shows the registries' documentation on hover,
goes to the declaration of models, data, params and stages, and formats with `effc fmt`.

The editor-facing work is done by pure functions of the text and a character offset
(`diagnostics`, `complete`, `hover`, `definition`, `format_edit`); the server only converts
positions and wires them to LSP messages. Context (which registry follows `with`, which
call an argument belongs to) comes from a small tokenizer over the text before the cursor,
because the text being typed rarely parses. Model trees for selector paths come from the
checker: the current text's, else the text with the cursor's line left out, else the last
text that checked.

No handler lets an exception out: a failure becomes an internal-error diagnostic (E9001) or
an empty answer, and a one-line log message; never a traceback in the editor.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from lsprotocol import types as lsp
from pygls.server import LanguageServer
from pygls.uris import to_fs_path

from effc import __version__
from effc.lang import ast, registry as R
from effc.lang.check import CheckResult, ModelInfo, check_source
from effc.lang.diagnostics import Diagnostic, Severity
from effc.lang.docs import default_text  # the generated reference's wording of defaults
from effc.lang.format import format_source
from effc.lang.tree import KINDS, Module, Selected, walk
from effc.lang.types import BoolT, CallT, DataT, Entry, EnumT, ListT, ModelT, Param, Registry

# Statements that begin a line, by where the line is (the grammar's `item` and `stmt`).
TOP_KEYWORDS = ("pipeline", "param", "model", "data", "budget", "stage", "export")
STAGE_KEYWORDS = ("train", "eval", "adapt", "share", "tie", "prune", "quantize", "export")
# The word that joins a selector statement's target to its technique.
CONNECTORS = {"adapt": "with", "share": "as", "tie": "with", "prune": "with", "quantize": "to"}
SELECTOR_STATEMENTS = tuple(CONNECTORS)
_STATEMENT_WORDS = frozenset(TOP_KEYWORDS + STAGE_KEYWORDS)

_SEVERITY = {Severity.ERROR: lsp.DiagnosticSeverity.Error, Severity.WARNING: lsp.DiagnosticSeverity.Warning,
             Severity.NOTE: lsp.DiagnosticSeverity.Information}

# ---------------------------------------------------------------- text and positions

_NEWLINE = re.compile(r"\r\n|\r|\n")  # the line breaks LSP counts (the parser normalises the same three)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split_lines(text: str) -> list[str]:
    return _NEWLINE.split(text)


def line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in _NEWLINE.finditer(text)]


def _units(s: str, encoding: str) -> int:
    """The length of `s` in the client's position units."""
    if encoding == lsp.PositionEncodingKind.Utf8:
        return len(s.encode("utf-8"))
    if encoding == lsp.PositionEncodingKind.Utf32:
        return len(s)
    return len(s.encode("utf-16-le")) // 2


def _chars(line: str, units: int, encoding: str) -> int:
    """The character index in `line` of a position given in client units (clamped)."""
    if encoding == lsp.PositionEncodingKind.Utf32:
        return min(max(units, 0), len(line))
    n = 0
    for i, ch in enumerate(line):
        if n >= units:
            return i
        n += _units(ch, encoding)
    return len(line)


def offset_at(text: str, pos: lsp.Position, encoding: str = lsp.PositionEncodingKind.Utf16) -> int:
    """A client position as a character offset into `text` (clamped into the text)."""
    starts = line_starts(text)
    if pos.line >= len(starts):
        return len(text)
    start = starts[pos.line]
    end = starts[pos.line + 1] if pos.line + 1 < len(starts) else len(text)
    line = _NEWLINE.sub("", text[start:end])
    return start + _chars(line, pos.character, encoding)


def position(lines: list[str], line: int, col: int, encoding: str = lsp.PositionEncodingKind.Utf16) -> lsp.Position:
    """A 0-based (line, character index) as a client position, clamped into the document."""
    if line >= len(lines):
        line, col = len(lines) - 1, len(lines[-1])
    line = max(line, 0)
    text = lines[line]
    return lsp.Position(line, _units(text[:max(min(col, len(text)), 0)], encoding))


def span_range(span, lines: list[str], encoding: str = lsp.PositionEncodingKind.Utf16) -> lsp.Range:
    """A checker span (1-based, end exclusive) as an LSP range (0-based, end exclusive)."""
    start = position(lines, span.line - 1, span.col - 1, encoding)
    end = position(lines, span.end_line - 1, span.end_col - 1, encoding)
    if (end.line, end.character) < (start.line, start.character):
        end = start
    return lsp.Range(start, end)


def whole_range(text: str, encoding: str = lsp.PositionEncodingKind.Utf16) -> lsp.Range:
    lines = split_lines(text)
    return lsp.Range(lsp.Position(0, 0), lsp.Position(len(lines) - 1, _units(lines[-1], encoding)))


# ---------------------------------------------------------------- diagnostics


def diagnostics(result: CheckResult, text: str, path: str,
                encoding: str = lsp.PositionEncodingKind.Utf16) -> list[lsp.Diagnostic]:
    """The checker's diagnostics as LSP diagnostics; the hint follows the message."""
    lines = split_lines(text)
    return [_diagnostic(d, lines, path, encoding) for d in result.diagnostics]


def _diagnostic(d: Diagnostic, lines: list[str], path: str, encoding: str) -> lsp.Diagnostic:
    message = d.message + (f"\nhint: {d.hint}" if d.hint else "")
    if d.span.file not in (path, "<input>"):  # about another file (a checkpoint's config): say where
        message = f"{d.span}: {message}"
        rng = lsp.Range(lsp.Position(0, 0), lsp.Position(0, 0))
    else:
        rng = span_range(d.span, lines, encoding)
    return lsp.Diagnostic(rng, message, severity=_SEVERITY[d.severity], code=d.code, source="effc")


def internal_error(exc: BaseException, what: str) -> lsp.Diagnostic:
    return lsp.Diagnostic(lsp.Range(lsp.Position(0, 0), lsp.Position(0, 1)),
                          f"internal error in the language server ({what}): {type(exc).__name__}: {exc}\n"
                          "hint: please report this with the .eff file", severity=lsp.DiagnosticSeverity.Error,
                          code="E9001", source="effc")


# ---------------------------------------------------------------- tokens before the cursor


@dataclass(frozen=True)
class Tok:
    kind: str  # name | num | str | op | nl | comment
    text: str
    start: int
    end: int


_LEX = re.compile(r"""
    (?P<ws>[ \t\f\ufeff]+)
  | (?P<nl>\r\n|\r|\n)
  | (?P<comment>\#[^\r\n]*)
  | (?P<str>"(?:[^"\\\r\n]|\\.)*"?)
  | (?P<num>[0-9][0-9]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?[A-Za-z]*)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\*\*|.)
""", re.VERBOSE)


def tokens(text: str) -> list[Tok]:
    out = []
    for m in _LEX.finditer(text):
        kind = m.lastgroup
        if kind != "ws":
            out.append(Tok(kind, m.group(), m.start(), m.end()))
    return out


def statements(toks: list[Tok]) -> list[list[Tok]]:
    """The tokens split into logical lines, without newlines and comments. A line goes on
    inside an open bracket, unless the next line starts with a statement keyword (an
    unclosed bracket above must not swallow the rest of the file)."""
    out: list[list[Tok]] = [[]]
    depth = 0
    for i, t in enumerate(toks):
        if t.kind == "nl":
            nxt = [u for u in toks[i + 1:i + 4] if u.kind not in ("nl", "comment")]
            starts = len(nxt) >= 1 and nxt[0].text in _STATEMENT_WORDS and (len(nxt) < 2 or nxt[1].text != "=")
            if depth == 0 or starts:
                depth = 0
                if out[-1]:
                    out.append([])
            continue
        if t.kind == "comment":
            continue
        if t.kind == "op" and t.text in "([{":
            depth += 1
        elif t.kind == "op" and t.text in ")]}":
            depth = max(depth - 1, 0)
        out[-1].append(t)
    return out


def _statement(toks: list[Tok]) -> list[Tok]:
    """The tokens of the logical line that `toks` (the text before the cursor) ends in."""
    return statements(toks)[-1]


# ---------------------------------------------------------------- what the cursor is in


@dataclass(frozen=True)
class Context:
    """What may be written at the cursor.

    kind: "keywords" (words), "registry" (names of registries), "args" (the parameters of
    entry not yet given), "value" (a value of param of entry), "selector" (members of the
    module reached by path in model), "names" (declared names of the kinds in words),
    "complete" (a whole selector: its statement's joining word may follow), "none"."""

    kind: str
    words: tuple[str, ...] = ()
    registries: tuple[Registry, ...] = ()
    entry: Entry | None = None
    param: Param | None = None
    given: frozenset = frozenset()
    model: str | None = None
    path: tuple = ()


NONE = Context("none")


def context(text: str, offset: int) -> Context:
    """What may be typed at `offset` of `text` (the word being typed there excluded)."""
    before = text[:offset]
    toks = tokens(before)
    word = re.search(r"[A-Za-z_][A-Za-z0-9_]*$", before)
    last = toks[-1] if toks else None
    if last is not None and last.end == offset:
        open_string = last.kind == "str" and (len(last.text) == 1 or not last.text.endswith('"'))
        if last.kind in ("num", "comment") or open_string:
            return NONE  # inside a number, a string or a comment
        if last.kind == "name":
            toks = toks[:-1]  # the word being typed
    stmt = _statement(toks)
    spaced = bool(before[:offset - (len(word.group()) if word else 0)][-1:].isspace())
    if not stmt:
        line = before[before.rfind("\n") + 1:] if "\n" in before else before
        indented = len(line) - len(line.lstrip(" \t")) > 0
        return Context("keywords", STAGE_KEYWORDS if indented else TOP_KEYWORDS)
    stack = []
    for i, t in enumerate(stmt):
        if t.kind == "op" and t.text in "([{":
            stack.append(i)
        elif t.kind == "op" and t.text in ")]}" and stack:
            stack.pop()
    if stack:
        return _bracketed(stmt, stack)
    return _plain(stmt, spaced)


def _bracketed(stmt: list[Tok], stack: list[int]) -> Context:
    i = stack[-1]
    opener = stmt[i].text
    first = stmt[0].text
    if opener == "{" and first in SELECTOR_STATEMENTS:
        return _selector_context(stmt[1:i], brace=True)
    if opener == "[":
        # metrics=[...] : a value of the list's item type
        if i >= 2 and stmt[i - 1].text == "=" and stmt[i - 2].kind == "name" and len(stack) >= 2:
            entry = _call_entry(stmt, stack[:-1])
            p = entry.param(stmt[i - 2].text) if entry else None
            if p is not None:
                return Context("value", entry=entry, param=p)
        return NONE
    if opener != "(":
        return NONE
    entry = _call_entry(stmt, stack)
    if entry is None:
        return NONE
    seg, depth, given = [], 0, set()
    for t in stmt[i + 1:]:
        if t.kind == "op" and t.text in "([{":
            depth += 1
        elif t.kind == "op" and t.text in ")]}":
            depth -= 1
        elif t.kind == "op" and t.text == "," and depth == 0:
            seg = []
            continue
        elif t.text == "=" and depth == 0 and len(seg) == 1 and seg[0].kind == "name":
            given.add(seg[0].text)
        seg.append(t)
    given = frozenset(given)
    if not seg:
        return Context("args", entry=entry, given=given)
    if len(seg) >= 2 and seg[0].kind == "name" and seg[1].text == "=" and \
            (len(seg) == 2 or seg[-1].text in ("+", "-", "*", "/")):
        p = entry.param(seg[0].text)
        if p is not None:
            return Context("value", entry=entry, param=p)
    return NONE


def _call_entry(stmt: list[Tok], stack: list[int]) -> Entry | None:
    """The registry entry whose argument list the innermost open '(' of `stack` is."""
    i = stack[-1]
    first = stmt[0].text
    prev = stmt[i - 1] if i > 0 else None
    outer = len(stack) == 1
    if first == "budget" and i == 1:
        return R.STATEMENTS["budget"]
    if outer and first in ("train", "eval", "export"):
        return R.STATEMENTS[first]
    if prev is None or prev.kind != "name":
        return None
    name, before = prev.text, stmt[i - 2].text if i >= 2 else ""
    regs: list[Registry] = []
    if before in ("with", "as", "to") and first in R.TECHNIQUES:
        regs = [R.TECHNIQUES[first]]
    elif before == "=" and outer and first == "model":
        regs = [R.FAMILIES, R.MERGES]
    elif before == "=" and outer and first == "data":
        regs = [R.DATA_SOURCES]
    elif before == "=" and not outer and i >= 3 and stmt[i - 3].kind == "name":
        owner = _call_entry(stmt, stack[:-1])
        p = owner.param(stmt[i - 3].text) if owner else None
        if p is not None and isinstance(p.type, CallT) and p.type.registry in R.CALLABLES:
            regs = [R.CALLABLES[p.type.registry]]
    regs = regs or list(R.all_registries().values())
    return next((r.entries[name] for r in regs if name in r.entries), None)


def _plain(stmt: list[Tok], spaced: bool) -> Context:
    first, rest = stmt[0].text, stmt[1:]
    last = stmt[-1].text
    if first in SELECTOR_STATEMENTS:
        joins = [k for k, t in enumerate(rest) if t.kind == "name" and t.text in ("with", "as", "to")]
        if not joins:
            ctx = _selector_context(stmt[1:], brace=False)
            if ctx.kind == "complete":
                return Context("keywords", (CONNECTORS[first],)) if spaced else NONE
            return ctx
        j = joins[0]
        if first == "tie":
            ctx = _selector_context(rest[j + 1:], brace=False)
            return NONE if ctx.kind == "complete" else ctx
        if j == len(rest) - 1 and first in R.TECHNIQUES:
            return Context("registry", registries=(R.TECHNIQUES[first],))
        return NONE
    if first in ("train", "eval", "export"):
        if not rest:
            return Context("names", ("model",))
        if last == "@":
            return Context("names", ("stage",))
        if last == "on" and first != "export":
            return Context("names", ("data",))
        if last == "." and len(rest) >= 3 and rest[-3].text == "on":
            return Context("keywords", R.DATA_SPLITS)
        if spaced and "on" not in [t.text for t in rest] and "to" not in [t.text for t in rest] \
                and rest[-1].kind == "name":
            return Context("keywords", ("to",) if first == "export" else ("on",))
        return NONE
    if first in ("model", "data", "param") and len(stmt) == 3 and last == "=":
        if first == "model":
            return Context("registry", registries=(R.FAMILIES, R.MERGES))
        if first == "data":
            return Context("registry", registries=(R.DATA_SOURCES,))
        return Context("names", ("param",))
    if first == "param" and len(stmt) > 3 and stmt[2].text == "=" and last in ("+", "-", "*", "/"):
        return Context("names", ("param",))
    return NONE


def _selector_context(sel: list[Tok], brace: bool) -> Context:
    """`tiny.layers[*].attn.` -> the members of attn; `tiny` alone -> the model names."""
    if not sel:
        return Context("names", ("model",))
    if sel[0].kind != "name":
        return NONE
    model, path, k = sel[0].text, [], 1
    while k < len(sel):
        t = sel[k]
        if t.text == ":":
            return Context("keywords", KINDS) if k == len(sel) - 1 else NONE
        if t.text != ".":
            return NONE
        k += 1
        if k == len(sel):
            return Context("selector", model=model, path=tuple(path))
        t = sel[k]
        if t.text == "**":
            path.append(("any",))
            k += 1
        elif t.kind == "name":
            k += 1
            indexed = k < len(sel) and sel[k].text == "["
            if indexed:
                close = next((n for n in range(k, len(sel)) if sel[n].text == "]"), None)
                if close is None:
                    return NONE
                k = close + 1
            path.append(("field", (t.text,), indexed))
        elif t.text == "{":
            close = next((n for n in range(k, len(sel)) if sel[n].text == "}"), None)
            if close is None:
                return Context("selector", model=model, path=tuple(path)) if brace else NONE
            path.append(("field", tuple(x.text for x in sel[k + 1:close] if x.kind == "name"), False))
            k = close + 1
        else:
            return NONE
    if brace:
        return Context("selector", model=model, path=tuple(path))
    return Context("complete", model=model, path=tuple(path))


def members(tree: Module, path: Iterable[tuple]) -> list[tuple[str, Module]]:
    """The named members below the modules a selector prefix reaches (in tree order)."""
    current = [tree]
    for seg in path:
        if seg[0] == "any":
            current = [s.module for m in current for s in walk(Selected("", m))]
            continue
        _, names, indexed = seg
        nxt = [c for m in current for n in names if (c := m.child(n)) is not None]
        current = [it for m in nxt if m.is_list for it in m.items] if indexed else nxt
    out: dict[str, Module] = {}
    for m in current:
        for n, c in m.children:
            out.setdefault(n, c)
    return list(out.items())


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Decl:
    kind: str  # model | data | param | stage
    name: str
    line: int  # 0-based
    col: int  # character index of the name
    end_col: int
    text: str  # the declaration's source lines


def declarations(text: str, program: ast.Program | None) -> dict[tuple[str, str], Decl]:
    """Declared names by (namespace, name): namespace "name" (params, models and data share
    one) or "stage". From the parsed program when the text parses, else from the lines."""
    lines = split_lines(text)
    out: dict[tuple[str, str], Decl] = {}
    kinds = {ast.Param: "param", ast.ModelDecl: "model", ast.DataDecl: "data", ast.Stage: "stage"}
    if program is not None:
        for item in program.items:
            kind = kinds.get(type(item))
            if kind is None:
                continue
            s, last = item.name.span, item.span.line if kind == "stage" else item.span.end_line
            body = "\n".join(lines[s.line - 1:min(last, s.line + 7)])
            key = ("stage" if kind == "stage" else "name", item.name.name)
            out.setdefault(key, Decl(kind, item.name.name, s.line - 1, s.col - 1, s.end_col - 1, body))
        return out
    for no, line in enumerate(lines):
        m = re.match(r"(param|model|data|stage)[ \t]+([A-Za-z_][A-Za-z0-9_]*)", line)
        if m:
            key = ("stage" if m.group(1) == "stage" else "name", m.group(2))
            out.setdefault(key, Decl(m.group(1), m.group(2), no, m.start(2), m.end(2), line))
    return out


def declarations_only(text: str) -> str:
    """The `param` and `model` declarations of `text`, one logical line each: what a
    model's module tree depends on, without the statements being edited."""
    out = []
    for stmt in statements(tokens(text)):
        first = stmt[0] if stmt else None
        at_top = first is not None and (first.start == 0 or text[first.start - 1] in "\r\n")
        if at_top and first.text in ("param", "model") and not _open(stmt):
            out.append(text[first.start:stmt[-1].end])
    return "\n".join(out) + "\n"


def _open(stmt: list[Tok]) -> bool:
    depth = 0
    for t in stmt:
        if t.kind == "op" and t.text in "([{":
            depth += 1
        elif t.kind == "op" and t.text in ")]}":
            depth = max(depth - 1, 0)
    return depth > 0


def _word_at(text: str, offset: int) -> tuple[str, int, int] | None:
    for m in _WORD.finditer(text, max(offset - 200, 0), min(offset + 200, len(text))):
        if m.start() <= offset <= m.end():
            return m.group(), m.start(), m.end()
    return None


def _reference(text: str, offset: int, decls: dict) -> Decl | None:
    """The declaration a name at `offset` refers to: not a member (`.x`), not an argument
    name (`x=`), not a keyword of the statement."""
    found = _word_at(text, offset)
    if found is None:
        return None
    word, start, end = found
    before, after = text[:start].rstrip(" \t"), text[end:].lstrip(" \t")
    if before.endswith("@"):
        return decls.get(("stage", word))
    if before.endswith(".") or (after.startswith("=") and not after.startswith("==")
                                and not re.match(r"(param|model|data)[ \t]", _line_of(text, start).lstrip())):
        return None
    return decls.get(("name", word)) or decls.get(("stage", word))


def _line_of(text: str, offset: int) -> str:
    return text[text.rfind("\n", 0, offset) + 1:offset]


# ---------------------------------------------------------------- completion


def complete(text: str, offset: int, models: dict[str, ModelInfo], decls: dict) -> list[lsp.CompletionItem]:
    ctx = context(text, offset)
    K = lsp.CompletionItemKind
    if ctx.kind == "keywords":
        return [lsp.CompletionItem(w, kind=K.Keyword, detail=_keyword_detail(w)) for w in ctx.words]
    if ctx.kind == "registry":
        return [_entry_item(e, r) for r in ctx.registries for e in r.entries.values()]
    if ctx.kind == "args":
        return [lsp.CompletionItem(p.name, kind=K.Property, detail=_param_detail(p), insert_text=f"{p.name}=",
                                   documentation=p.doc or None, sort_text=f"{i:03d}")
                for i, p in enumerate(ctx.entry.params) if p.name not in ctx.given]
    if ctx.kind == "value":
        return _values(ctx.param, decls)
    if ctx.kind == "names":
        items = []
        for (ns, name), d in decls.items():
            if d.kind in ctx.words:
                items.append(lsp.CompletionItem(name, kind=K.Variable, detail=f"{d.kind}: {d.text.strip()[:80]}"))
        return items
    if ctx.kind == "selector":
        info = models.get(ctx.model)
        if info is None or info.tree is None:
            return []
        items = [lsp.CompletionItem(n, kind=K.Module, detail=_module_detail(m))
                 for n, m in members(info.tree, ctx.path)]
        return items + [lsp.CompletionItem("**", kind=K.Operator, detail="this module and every module below it")]
    return []


def _keyword_detail(word: str) -> str | None:
    e = R.STATEMENTS.get(word)
    return e.doc if e else None


def _entry_item(e: Entry, reg: Registry) -> lsp.CompletionItem:
    return lsp.CompletionItem(e.name, kind=lsp.CompletionItemKind.Function,
                              detail=f"{reg.kind}: {_signature(e)}",
                              documentation=lsp.MarkupContent(lsp.MarkupKind.Markdown, entry_markdown(e, reg)))


def _values(p: Param, decls: dict) -> list[lsp.CompletionItem]:
    K = lsp.CompletionItemKind
    t = p.type.item if isinstance(p.type, ListT) else p.type
    names = lambda *kinds: [d for d in decls.values() if d.kind in kinds]  # noqa: E731
    if isinstance(t, EnumT):
        return [lsp.CompletionItem(c, kind=K.EnumMember) for c in t.choices]
    if isinstance(t, BoolT):
        return [lsp.CompletionItem(w, kind=K.Keyword) for w in ("true", "false")]
    if isinstance(t, CallT) and t.registry in R.CALLABLES:
        reg = R.CALLABLES[t.registry]
        return [_entry_item(e, reg) for e in reg.entries.values()]
    if isinstance(t, ModelT):
        stages = [d.name for d in names("stage")]
        return [lsp.CompletionItem(label, kind=K.Variable) for d in names("model")
                for label in [d.name] + [f"{d.name}@{s}" for s in stages]]
    if isinstance(t, DataT):
        return [lsp.CompletionItem(label, kind=K.Variable) for d in names("data")
                for label in [d.name] + [f"{d.name}.{s}" for s in R.DATA_SPLITS]]
    return [lsp.CompletionItem(d.name, kind=K.Variable, detail=d.text.strip()) for d in names("param")]


def _module_detail(m: Module) -> str:
    if m.is_list:
        return f"list of {len(m.items)}: index it, as in [*] or [0]"
    return m.kind + (f" {m.shape[0]} -> {m.shape[1]}" if m.kind == "linear" and m.shape else "")


# ---------------------------------------------------------------- hover


def _signature(e: Entry) -> str:
    return f"{e.name}(" + ", ".join(p.name + ("" if p.required else "=" + default_text(p).strip("`"))
                                   for p in e.params) + ")"


def _default_phrase(p: Param) -> str:
    return "required" if p.required else f"default {default_text(p)}"


def _param_detail(p: Param) -> str:
    return f"{p.type.describe()}; {_default_phrase(p).replace('`', '')}"


def entry_markdown(e: Entry, reg: Registry | None = None, title: str | None = None) -> str:
    """A registry entry for a person: what it is, its parameters (type, default, range),
    what it applies to and its paper."""
    what = title or (reg.kind if reg else "")
    out = [f"**{e.name}**" + (f" — {what}" if what else ""), "", f"`{_signature(e)}`", "", e.doc, ""]
    if e.params:
        out.append("Parameters:")
        for p in e.params:
            note = "" if p.available else " *(not available in this version)*"
            out.append(f"- `{p.name}`: {p.type.describe()}; {_default_phrase(p)}. {p.doc}{note}".rstrip())
        out.append("")
    else:
        out += ["No parameters.", ""]
    if e.targets:
        out += [f"Applies to: {', '.join(e.targets)} modules.", ""]
    if e.paper:
        out += [f"Paper: {e.paper}", ""]
    return "\n".join(out).rstrip() + "\n"


def param_markdown(p: Param, owner: Entry) -> str:
    return (f"**{p.name}** — parameter of `{owner.name}`\n\n{p.type.describe()}; {_default_phrase(p)}\n\n"
            f"{p.doc}\n")


def hover(text: str, offset: int, decls: dict) -> str | None:
    """Markdown for the name at `offset`, or None."""
    found = _word_at(text, offset)
    if found is None:
        return None
    word, start, end = found
    ctx = context(text, start)
    after = text[end:].lstrip(" \t")
    if ctx.kind == "registry":
        hit = next(((e, r) for r in ctx.registries if (e := r.entries.get(word))), None)
        if hit:
            return entry_markdown(*hit)
    if ctx.kind == "args" and after.startswith("="):
        p = ctx.entry.param(word)
        if p is not None:
            return param_markdown(p, ctx.entry)
    if ctx.kind == "value":
        t = ctx.param.type.item if isinstance(ctx.param.type, ListT) else ctx.param.type
        if isinstance(t, CallT) and t.registry in R.CALLABLES and word in R.CALLABLES[t.registry].entries:
            reg = R.CALLABLES[t.registry]
            return entry_markdown(reg.entries[word], reg)
        if isinstance(t, EnumT) and word in t.choices:
            return f"**{word}** — a choice of `{ctx.entry.name}({ctx.param.name}=...)`\n\n{ctx.param.doc}\n"
    decl = _reference(text, offset, decls)
    if decl is not None:
        return f"{decl.kind} **{decl.name}** (line {decl.line + 1})\n\n```eff\n{decl.text}\n```\n"
    if after.startswith("("):
        hits = [entry_markdown(e, r) for r in R.all_registries().values() if (e := r.entries.get(word))]
        if hits:
            return "\n---\n\n".join(hits)
    if word in R.STATEMENTS and ctx.kind == "keywords":
        return entry_markdown(R.STATEMENTS[word], title="statement options")
    return None


# ---------------------------------------------------------------- definition and formatting


def definition(text: str, offset: int, decls: dict) -> Decl | None:
    return _reference(text, offset, decls)


def format_edit(text: str, path: str, encoding: str = lsp.PositionEncodingKind.Utf16) -> list[lsp.TextEdit] | None:
    """One edit replacing the document with `effc fmt`'s text; [] when it is formatted
    already; None when the text does not parse (there is nothing to format)."""
    formatted, _ = format_source(text, path)
    if formatted is None:
        return None
    if formatted == text:
        return []
    return [lsp.TextEdit(whole_range(text, encoding), formatted)]


# ---------------------------------------------------------------- the server


@dataclass
class _State:
    """What the server keeps per open document."""

    text: str | None = None  # the text `result` is of
    result: CheckResult | None = None
    models: dict[str, ModelInfo] = field(default_factory=dict)  # the last text that gave trees


def _path(uri: str) -> str:
    try:
        return (to_fs_path(uri) if uri.startswith("file:") else None) or "<input>"
    except Exception:  # a malformed URI: check as an unnamed file
        return "<input>"


class EffServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("effc", __version__, text_document_sync_kind=lsp.TextDocumentSyncKind.Full)
        self.docs: dict[str, _State] = {}

    def report_server_error(self, error: Exception, source: Any) -> None:
        logging.getLogger("effc.lsp").error("internal error: %s: %s", type(error).__name__, error)

    @property
    def encoding(self) -> str:
        return self.workspace.position_encoding or lsp.PositionEncodingKind.Utf16

    def text(self, uri: str) -> str:
        return self.workspace.get_text_document(uri).source

    def at(self, params) -> tuple[str, str, int]:
        """(uri, text, offset) of a request at a position in a document."""
        uri = params.text_document.uri
        text = self.text(uri)
        return uri, text, offset_at(text, params.position, self.encoding)

    def check(self, uri: str, version: int | None) -> None:
        state = self.docs.setdefault(uri, _State())
        text = self.text(uri)
        try:
            result = check_source(text, _path(uri))
            state.text, state.result = text, result
            if any(m.tree is not None for m in result.models.values()):
                state.models = result.models
            diags = diagnostics(result, text, _path(uri), self.encoding)
        except Exception as exc:  # noqa: BLE001 - reported as a diagnostic, never raised
            diags = [internal_error(exc, "check")]
        self.publish_diagnostics(uri, diags, version)

    def models(self, uri: str, text: str) -> dict[str, ModelInfo]:
        """Trees for selector completion: this text's; else those of its param and model
        declarations alone (the statement being typed rarely parses); else the last known."""
        state = self.docs.get(uri) or _State()
        if state.text == text and state.result is not None and state.result.program is not None:
            return state.result.models
        result = check_source(declarations_only(text), _path(uri))
        return result.models if any(m.tree is not None for m in result.models.values()) else state.models

    def decls(self, uri: str, text: str) -> dict:
        state = self.docs.get(uri)
        fresh = state is not None and state.result is not None and state.text == text
        return declarations(text, state.result.program if fresh else None)


def _guarded(default: Any) -> Callable:
    """A handler that answers `default` instead of raising (and logs one line)."""
    def wrap(fn: Callable) -> Callable:
        def run(ls: EffServer, params):
            try:
                return fn(ls, params)
            except Exception as exc:  # noqa: BLE001 - an editor must never see a traceback
                logging.getLogger("effc.lsp").error("internal error in %s: %s: %s", fn.__name__,
                                                    type(exc).__name__, exc)
                return default
        run.__name__ = fn.__name__
        return run
    return wrap


def _checks_its_version(name: str) -> Callable:
    """The handler `name` (did_open, did_change) of a document whose text is new: check it
    and publish its diagnostics at the document's version."""
    def handler(ls: EffServer, params: lsp.DidOpenTextDocumentParams | lsp.DidChangeTextDocumentParams) -> None:
        ls.check(params.text_document.uri, params.text_document.version)
    handler.__name__ = name
    return _guarded(None)(handler)


def make_server() -> EffServer:
    server = EffServer()

    server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)(_checks_its_version("did_open"))
    server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)(_checks_its_version("did_change"))

    @server.feature(lsp.TEXT_DOCUMENT_DID_SAVE)
    @_guarded(None)
    def did_save(ls: EffServer, params: lsp.DidSaveTextDocumentParams) -> None:
        ls.check(params.text_document.uri, None)

    @server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
    @_guarded(None)
    def did_close(ls: EffServer, params: lsp.DidCloseTextDocumentParams) -> None:
        ls.docs.pop(params.text_document.uri, None)
        ls.publish_diagnostics(params.text_document.uri, [])

    @server.feature(lsp.TEXT_DOCUMENT_COMPLETION,
                    lsp.CompletionOptions(trigger_characters=[".", "(", ",", "=", "@", ":", "{", "["]))
    @_guarded(None)
    def completion(ls: EffServer, params: lsp.CompletionParams) -> lsp.CompletionList:
        uri, text, offset = ls.at(params)
        ctx = context(text, offset)
        models = ls.models(uri, text) if ctx.kind == "selector" else {}
        return lsp.CompletionList(False, complete(text, offset, models, ls.decls(uri, text)))

    @server.feature(lsp.TEXT_DOCUMENT_HOVER)
    @_guarded(None)
    def on_hover(ls: EffServer, params: lsp.HoverParams) -> lsp.Hover | None:
        uri, text, offset = ls.at(params)
        md = hover(text, offset, ls.decls(uri, text))
        return lsp.Hover(lsp.MarkupContent(lsp.MarkupKind.Markdown, md)) if md else None

    @server.feature(lsp.TEXT_DOCUMENT_DEFINITION)
    @_guarded(None)
    def on_definition(ls: EffServer, params: lsp.DefinitionParams) -> lsp.Location | None:
        uri, text, offset = ls.at(params)
        d = definition(text, offset, ls.decls(uri, text))
        if d is None:
            return None
        lines = split_lines(text)
        return lsp.Location(uri, lsp.Range(position(lines, d.line, d.col, ls.encoding),
                                           position(lines, d.line, d.end_col, ls.encoding)))

    @server.feature(lsp.TEXT_DOCUMENT_FORMATTING)
    @_guarded(None)
    def formatting(ls: EffServer, params: lsp.DocumentFormattingParams) -> list[lsp.TextEdit] | None:
        uri = params.text_document.uri
        return format_edit(ls.text(uri), _path(uri), ls.encoding)

    return server


class _OneLine(logging.Formatter):
    """Log records as one line each: a traceback never reaches the editor's log."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        lines = super().format(record).splitlines()
        return "effc lsp: " + (lines[0] if lines else "")


def serve() -> None:
    """Serve one editor over stdin/stdout until it disconnects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    make_server().start_io()
