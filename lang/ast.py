"""The typed AST of a `.eff` program.

Every node is a frozen dataclass carrying the `Span` of the text that made it. Spans do
not take part in equality, so two programs that differ only in layout and comments
compare equal; number literals keep their source text for the formatter, also outside
equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from effc.lang.diagnostics import Span

_NOSPAN = Span()


def _span() -> Span:
    return field(default=_NOSPAN, compare=False, repr=False)


@dataclass(frozen=True)
class Ident:
    name: str
    span: Span = _span()


# ---------------------------------------------------------------- values (expressions)


@dataclass(frozen=True)
class Int:
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class Float:
    value: float
    text: str = field(default="", compare=False)
    span: Span = _span()


@dataclass(frozen=True)
class Size:
    """A byte count written with a unit: `4GiB`, `512MiB`, `1.5GB`."""

    value: int  # bytes
    text: str = field(default="", compare=False)
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    """A bare name: a param, model or data reference, or an enum choice (`init=average`)."""

    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Attr:
    """`corpus.validation`: a named part of a declaration."""

    base: Ident
    attr: Ident
    span: Span = _span()


@dataclass(frozen=True)
class Snapshot:
    """`tiny@pretrain`: the model as it was at the end of a stage."""

    model: Ident
    stage: Ident
    span: Span = _span()


@dataclass(frozen=True)
class KwArg:
    name: Ident
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """`lora(rank=8)`, `text("data/train.txt", seq=128)`. Arguments keep their written
    order (positional and keyword interleaved) so the checker can point at misuse."""

    func: Ident
    args: tuple["Expr | KwArg", ...]
    span: Span = _span()

    @property
    def positional(self) -> tuple["Expr", ...]:
        return tuple(a for a in self.args if not isinstance(a, KwArg))

    @property
    def keywords(self) -> tuple[KwArg, ...]:
        return tuple(a for a in self.args if isinstance(a, KwArg))


@dataclass(frozen=True)
class List:
    items: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span = _span()


Expr = Union[Int, Float, Size, Str, Bool, Name, Attr, Snapshot, Call, List, BinOp, Neg]

# ---------------------------------------------------------------- selectors


@dataclass(frozen=True)
class IndexAll:
    """`[*]`"""

    span: Span = _span()


@dataclass(frozen=True)
class IndexAt:
    """`[2]`, `[-1]`"""

    index: int
    span: Span = _span()


@dataclass(frozen=True)
class IndexSlice:
    """`[0:6]`, `[:3]`, `[2:]`; None is an open end."""

    start: int | None
    stop: int | None
    span: Span = _span()


Index = Union[IndexAll, IndexAt, IndexSlice]


@dataclass(frozen=True)
class Field:
    """`.layers`, `.layers[0:6]`"""

    name: Ident
    index: Index | None = None
    span: Span = _span()


@dataclass(frozen=True)
class NameSet:
    """`.{q,k,v}`"""

    names: tuple[Ident, ...]
    span: Span = _span()


@dataclass(frozen=True)
class AnyDepth:
    """`.**`: this node and every node below it."""

    span: Span = _span()


Segment = Union[Field, NameSet, AnyDepth]


@dataclass(frozen=True)
class Selector:
    model: Ident
    path: tuple[Segment, ...]
    kind: Ident | None = None
    span: Span = _span()


# ---------------------------------------------------------------- statements


@dataclass(frozen=True)
class ModelRef:
    """The model a statement acts on: `tiny`, or a snapshot `tiny@pretrain`."""

    model: Ident
    stage: Ident | None = None
    span: Span = _span()


@dataclass(frozen=True)
class DataRef:
    """`corpus` or `corpus.validation`."""

    data: Ident
    split: Ident | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Train:
    model: ModelRef
    data: DataRef
    options: tuple[KwArg, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Eval:
    model: ModelRef
    data: DataRef
    options: tuple[KwArg, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Adapt:
    target: Selector
    technique: Call
    span: Span = _span()


@dataclass(frozen=True)
class Share:
    target: Selector
    technique: Call
    span: Span = _span()


@dataclass(frozen=True)
class Tie:
    target: Selector
    source: Selector
    span: Span = _span()


@dataclass(frozen=True)
class Prune:
    target: Selector
    technique: Call
    span: Span = _span()


@dataclass(frozen=True)
class Quantize:
    target: Selector
    technique: Call
    span: Span = _span()


@dataclass(frozen=True)
class Export:
    model: ModelRef
    path: Str
    options: tuple[KwArg, ...] = ()
    span: Span = _span()


Stmt = Union[Train, Eval, Adapt, Share, Tie, Prune, Quantize, Export]

# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Pipeline:
    name: Ident
    span: Span = _span()


@dataclass(frozen=True)
class Param:
    name: Ident
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class ModelDecl:
    name: Ident
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class DataDecl:
    name: Ident
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Budget:
    options: tuple[KwArg, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Stage:
    name: Ident
    body: tuple[Stmt, ...]
    span: Span = _span()


Item = Union[Pipeline, Param, ModelDecl, DataDecl, Budget, Stage, Export]


@dataclass(frozen=True)
class Comment:
    """`# text`: kept for the formatter. `own_line` is false for a comment after code."""

    text: str
    own_line: bool
    span: Span = _span()


@dataclass(frozen=True)
class Program:
    items: tuple[Item, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)
    path: str = field(default="<input>", compare=False)
    span: Span = _span()

    @property
    def name(self) -> str | None:
        """The `pipeline NAME` of the file, if it has one."""
        return next((i.name.name for i in self.items if isinstance(i, Pipeline)), None)
