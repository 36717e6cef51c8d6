"""Value types of the language, and the typed signature records every registry uses.

A signature says, for each parameter: its type (with range or choices), its default, a
one-line doc, and whether this version implements it. The checker, the generated
language reference, and later the editors and the language server all read these
records, so a parameter is described once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Bytes:
    """A size value, in bytes."""

    n: int

    def __str__(self) -> str:
        for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if self.n >= f and self.n % f == 0:
                return f"{self.n // f}{unit}"
        return f"{self.n}B"


# ---------------------------------------------------------------- types


@dataclass(frozen=True)
class IntT:
    min: int | None = None
    max: int | None = None

    def describe(self) -> str:
        return "integer" + _range(self.min, self.max, False, False)


@dataclass(frozen=True)
class FloatT:
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        return "number" + _range(self.min, self.max, self.min_open, self.max_open)


@dataclass(frozen=True)
class SizeT:
    min: int = 1

    def describe(self) -> str:
        return "size (e.g. 4GiB)"


@dataclass(frozen=True)
class StrT:
    def describe(self) -> str:
        return "string"


@dataclass(frozen=True)
class PathT:
    """A path relative to the `.eff` file; `must_exist` files are checked statically."""

    must_exist: bool = True

    def describe(self) -> str:
        return "path (relative to the .eff file)"


@dataclass(frozen=True)
class TokenizerT:
    """"bytes", or a path (relative to the .eff file) to a tokenizer.json or a folder with one."""

    def describe(self) -> str:
        return '"bytes" or a path to a tokenizer.json or a checkpoint folder'


@dataclass(frozen=True)
class BoolT:
    def describe(self) -> str:
        return "boolean (true or false)"


@dataclass(frozen=True)
class EnumT:
    choices: tuple[str, ...]
    unavailable: tuple[str, ...] = ()  # settled choices whose implementation has not landed

    def describe(self) -> str:
        return " | ".join(self.choices)


@dataclass(frozen=True)
class ListT:
    item: Any
    length: int | None = None

    def describe(self) -> str:
        n = f" of {self.length}" if self.length else ""
        return f"list{n} [{self.item.describe()}]"


@dataclass(frozen=True)
class CallT:
    """A call into another registry (`optimizer=adamw(lr=1e-3)`); `bare_ok` also accepts a
    bare name for an entry with no required parameters (`schedule=constant`)."""

    registry: str
    bare_ok: bool = False

    def describe(self) -> str:
        return f"{self.registry} call"


@dataclass(frozen=True)
class ModelT:
    """A model name or a snapshot `model@stage`."""

    def describe(self) -> str:
        return "model or snapshot (m@stage)"


@dataclass(frozen=True)
class DataT:
    """A data name or split (`corpus`, `corpus.validation`)."""

    def describe(self) -> str:
        return "data or data.split"


def _range(lo, hi, lo_open, hi_open) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f" {'<' if hi_open else '<='} {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


# ---------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any = REQUIRED
    doc: str = ""
    available: bool = True  # False: settled in the language, implemented by a later issue
    default_doc: str | None = None  # how to print a computed default ("rank")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Problem:
    """A cross-argument constraint that failed: blame `arg`, say why, suggest a fix."""

    arg: str
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class Entry:
    """One registered name: a model family, data source, technique, optimizer, ..."""

    name: str
    params: tuple[Param, ...]
    doc: str
    paper: str | None = None
    # technique entries: the module kinds the technique applies to
    targets: tuple[str, ...] = ()
    # adapters that rescale the weight (DoRA, IA3): the only adapter on each weight they adapt
    exclusive: bool = False
    # adapters with no exact fold into the weights: why (merge_adapters=true is refused)
    unmergeable: str | None = None
    # (args) -> problems: constraints between arguments (heads must divide dim, ...)
    constraints: Callable[[dict], list[Problem]] | None = field(default=None, compare=False)
    # (args, targets) -> problems: constraints against the selected modules' shapes
    target_constraints: Callable[[dict, list], list[Problem]] | None = field(default=None, compare=False)
    # merges: how many snapshots they take at least (given positionally)
    min_operands: int = 1
    # model families: (checked args) -> args derived from elsewhere (a checkpoint's config)
    derive: Callable[[dict], dict] | None = field(default=None, compare=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class Registry:
    """One namespace of names. `planned` holds the settled names that a later issue
    implements, so the checker can say "not available in this version" for them."""

    kind: str  # how a user names an entry of it: "model family", "adapter", ...
    entries: dict[str, Entry]
    planned: dict[str, str] = field(default_factory=dict)  # name -> what brings it

    def names(self) -> list[str]:
        return sorted(self.entries)
