"""`effc fmt`: the one canonical layout of a `.eff` program.

The layout is a function of the AST, the comments and where the source had blank lines,
so formatting is idempotent and `parse(fmt(x)).program == parse(x).program`:

- top-level items at column 0, stage statements indented four spaces; at most one blank
  line, and only where the source had one (never right after a stage header);
- one space around keywords and the `=` of a declaration, none around the `=` of
  `key=value`; `*` and `/` tight, `+` and `-` spaced; parentheses only where precedence
  needs them;
- a line wider than 88 columns wraps its outermost argument or option list by filling,
  continuation lines one column right of the opening bracket (a single overlong argument
  overflows rather than breaking inside);
- every comment is kept, in order: an own-line comment stays before the code after it; a
  comment after code stays after its statement's last line; a comment inside a multi-line
  statement moves to its own line before that statement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from effc.lang import ast
from effc.lang.diagnostics import Diagnostic
from effc.lang.parser import parse

WIDTH = 88
INDENT = "    "


def format_source(text: str, path: str = "<input>") -> tuple[str | None, tuple[Diagnostic, ...]]:
    """Format `.eff` text. On a syntax error the text is None and the diagnostics say why."""
    result = parse(text, path)
    if result.program is None:
        return None, result.diagnostics
    return format_program(result.program), ()


def format_program(program: ast.Program) -> str:
    """The canonical text of a parsed program (spans place its comments and blank lines)."""
    lines: list[str] = []
    entries = _entries(program)
    for prev, entry in zip([None, *entries], entries):
        # Any run of blank lines in the source becomes one; none after a stage header, so
        # a stage's first statement always sits right under it.
        if prev is not None and not prev.header and entry.start - prev.end > 1:
            lines.append("")
        lines.extend(entry.lines)
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- placing comments


@dataclass
class _Leaf:
    """A unit of code that owns source lines: a declaration, a statement, or a stage
    header (a Stage stands for its header line only; its statements are leaves too)."""

    node: ast.Item | ast.Stmt
    depth: int  # 0 at top level, 1 inside a stage
    start: int
    end: int
    before: list[str] = field(default_factory=list)  # comments hoisted out of the node
    after: str | None = None  # the comment on the node's last line


@dataclass
class _Entry:
    """Output lines for one leaf or one own-line comment, with the source lines it came
    from (to find blank lines between entries)."""

    start: int
    end: int
    lines: list[str]
    header: bool = False


def _entries(program: ast.Program) -> list[_Entry]:
    leaves = _leaves(program)
    free: list[ast.Comment] = []
    for c in program.comments:
        leaf = next((x for x in leaves if x.start <= c.span.line <= x.end), None)
        if leaf is None:
            free.append(c)
        elif c.span.line == leaf.end and not c.own_line:
            leaf.after = c.text
        else:  # inside a multi-line node: its line is about to be re-laid out
            leaf.before.append(c.text)
    entries = [_leaf_entry(x) for x in leaves] + [_comment_entry(c, leaves) for c in free]
    return sorted(entries, key=lambda e: e.start)  # start lines are distinct


def _leaves(program: ast.Program) -> list[_Leaf]:
    out = []
    for item in program.items:
        if isinstance(item, ast.Stage):
            out.append(_Leaf(item, 0, item.span.line, item.span.line))
            out.extend(_Leaf(s, 1, s.span.line, s.span.end_line) for s in item.body)
        else:
            out.append(_Leaf(item, 0, item.span.line, item.span.end_line))
    return out


def _leaf_entry(leaf: _Leaf) -> _Entry:
    indent = INDENT * leaf.depth
    lines = [indent + text for text in leaf.before] + _layout(leaf.node, indent)
    if leaf.after is not None:
        lines[-1] += "  " + leaf.after
    return _Entry(leaf.start, leaf.end, lines, header=isinstance(leaf.node, ast.Stage))


def _comment_entry(c: ast.Comment, leaves: list[_Leaf]) -> _Entry:
    """An own-line comment goes at the indentation of the code after it; one that ends a
    stage keeps the stage's indentation if the source indented it, so a note about the
    stage's last statement is not mistaken for one about the next item."""
    line = c.span.line
    nxt = next((x for x in leaves if x.start > line), None)
    prev = next((x for x in reversed(leaves) if x.end < line), None)
    in_stage = (nxt is not None and nxt.depth == 1) or (
        (nxt is None or nxt.depth == 0) and prev is not None and prev.depth == 1 and c.span.col > 1)
    return _Entry(line, line, [(INDENT if in_stage else "") + c.text])


# ---------------------------------------------------------------- laying out code


def _layout(node: ast.Item | ast.Stmt, indent: str) -> list[str]:
    head, items, close = _parts(node)
    if items is None:
        return [indent + head]
    return _fill(indent + head, items, close)


def _fill(head: str, items: list[str], close: str) -> list[str]:
    """`head` (ending in an open bracket), the items, `close`: on one line if it fits,
    else filled, breaking after a comma, continuation lines one column right of the
    bracket. The first item always stays on the head's line."""
    flat = head + ", ".join(items) + close
    if len(flat) <= WIDTH or len(items) < 2:
        return [flat]
    pad = " " * len(head)
    lines, line = [], head + items[0]
    for i, item in enumerate(items[1:], 2):
        end = close if i == len(items) else ","
        if len(line) + len(", ") + len(item) + len(end) <= WIDTH:
            line += ", " + item
        else:
            lines.append(line + ",")
            line = pad + item
    return lines + [line + close]


_DECLS = {ast.Param: "param", ast.ModelDecl: "model", ast.DataDecl: "data"}
_TECHNIQUES = {ast.Adapt: ("adapt", "with"), ast.Share: ("share", "as"),
               ast.Prune: ("prune", "with"), ast.Quantize: ("quantize", "to")}


def _parts(node: ast.Item | ast.Stmt) -> tuple[str, list[str] | None, str]:
    """A node as its head text and, when it ends in a bracketed list that may wrap, the
    list's items and closing bracket (the head then ends with the opening bracket)."""
    match node:
        case ast.Pipeline(name=name):
            return f"pipeline {name.name}", None, ""
        case ast.Param() | ast.ModelDecl() | ast.DataDecl():
            return _trailing_value(f"{_DECLS[type(node)]} {node.name.name} = ", node.value)
        case ast.Budget(options=options):
            return "budget(", [format_expr(k) for k in options], ")"
        case ast.Stage(name=name):
            return f"stage {name.name}:", None, ""
        case ast.Train() | ast.Eval():
            verb = "train" if isinstance(node, ast.Train) else "eval"
            head = f"{verb} {_model_ref(node.model)} on {_data_ref(node.data)}"
            return _options(head, node.options)
        case ast.Export():
            head = f"export {_model_ref(node.model)} to {format_expr(node.path)}"
            return _options(head, node.options)
        case ast.Tie():
            target, source = format_selector(node.target), format_selector(node.source)
            return f"tie {target} with {source}", None, ""
        case ast.Adapt() | ast.Share() | ast.Prune() | ast.Quantize():
            verb, word = _TECHNIQUES[type(node)]
            return _trailing_value(f"{verb} {format_selector(node.target)} {word} ", node.technique)
    raise TypeError(f"not a declaration or statement: {node!r}")


def _trailing_value(head: str, value: ast.Expr) -> tuple[str, list[str] | None, str]:
    """A value that ends its line: a call's arguments or a list's items may wrap."""
    if isinstance(value, ast.Call):
        return f"{head}{value.func.name}(", [format_expr(a) for a in value.args], ")"
    if isinstance(value, ast.List):
        return head + "[", [format_expr(x) for x in value.items], "]"
    return head + format_expr(value), None, ""


def _options(head: str, options: tuple[ast.KwArg, ...]) -> tuple[str, list[str] | None, str]:
    if not options:  # `train m on d ()` and `train m on d` are the same statement
        return head, None, ""
    return head + " (", [format_expr(k) for k in options], ")"


def _model_ref(ref: ast.ModelRef) -> str:
    return ref.model.name + (f"@{ref.stage.name}" if ref.stage else "")


def _data_ref(ref: ast.DataRef) -> str:
    return ref.data.name + (f".{ref.split.name}" if ref.split else "")


# ---------------------------------------------------------------- values and selectors

# How tightly each form binds: sums 1, products 2, negation 3, atoms 4. An operand is
# parenthesised when it binds more loosely than its position needs.
_BINDING = {"+": 1, "-": 1, "*": 2, "/": 2}
_NEG, _ATOM = 3, 4
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"})


def format_expr(e: ast.Expr | ast.KwArg) -> str:
    """One value (or `key=value`) on one line, in canonical spelling."""
    match e:
        case ast.Int(value=value):
            return str(value)
        case ast.Float(text=text, value=value):
            return text or repr(value)  # a built (not parsed) literal has no source text
        case ast.Size(text=text, value=value):
            return text or f"{value}B"
        case ast.Str(value=value):
            return '"' + value.translate(_ESCAPES) + '"'
        case ast.Bool(value=value):
            return "true" if value else "false"
        case ast.Name(name=name):
            return name
        case ast.Attr(base=base, attr=attr):
            return f"{base.name}.{attr.name}"
        case ast.Snapshot(model=model, stage=stage):
            return f"{model.name}@{stage.name}"
        case ast.KwArg(name=name, value=value):
            return f"{name.name}={format_expr(value)}"
        case ast.Call(func=func, args=args):
            return f"{func.name}({', '.join(format_expr(a) for a in args)})"
        case ast.List(items=items):
            return "[" + ", ".join(format_expr(x) for x in items) + "]"
        case ast.BinOp(op=op, left=left, right=right):
            # Left-associative: `a - b - c` is `(a - b) - c`, so only the right operand
            # of equal binding needs parentheses (`a - (b - c)`).
            level = _BINDING[op]
            lhs, rhs = _operand(left, level), _operand(right, level + 1)
            return f"{lhs} {op} {rhs}" if level == 1 else f"{lhs}{op}{rhs}"
        case ast.Neg(operand=operand):
            return "-" + _operand(operand, _NEG)
    raise TypeError(f"not a value: {e!r}")


def _operand(e: ast.Expr, needed: int) -> str:
    text = format_expr(e)
    return f"({text})" if _binding(e) < needed else text


def _binding(e: ast.Expr) -> int:
    if isinstance(e, ast.BinOp):
        return _BINDING[e.op]
    return _NEG if isinstance(e, ast.Neg) else _ATOM


def format_selector(sel: ast.Selector) -> str:
    """`tiny.layers[*].attn.{q,v}`, `tiny.**:linear`."""
    text = sel.model.name + "".join("." + _segment(s) for s in sel.path)
    return text + (f":{sel.kind.name}" if sel.kind else "")


def _segment(seg: ast.Segment) -> str:
    match seg:
        case ast.AnyDepth():
            return "**"
        case ast.NameSet(names=names):
            return "{" + ",".join(n.name for n in names) + "}"
        case ast.Field(name=name, index=None):
            return name.name
        case ast.Field(name=name, index=ast.IndexAll()):
            return f"{name.name}[*]"
        case ast.Field(name=name, index=ast.IndexAt(index=at)):
            return f"{name.name}[{at}]"
        case ast.Field(name=name, index=ast.IndexSlice(start=start, stop=stop)):
            return f"{name.name}[{'' if start is None else start}:{'' if stop is None else stop}]"
    raise TypeError(f"not a selector segment: {seg!r}")
