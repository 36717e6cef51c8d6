"""The pass registry and the pass runner.

A pass is a pure function `(ir, ctx) -> (ir, n_rewrites)` registered with its name and the
passes that must run before it when both are in a pipeline (`after`). `run_passes` checks
the order before running anything, counts the rewrites of each pass, and reports a crash
inside a pass as an `InternalError` naming the pass and the passes before it: a failing
pass is a compiler bug, never the user's mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from effc.compiler.ir import IR
from effc.compiler.verify import verify
from effc.lang.check import AdapterUse, EditUse

PassFn = Callable[[IR, "PassContext"], tuple[IR, int]]


class InternalError(Exception):
    """A compiler bug, reported with the pass it happened in."""


class PassOrderError(Exception):
    """A pass list that breaks a declared order constraint or names an unknown pass."""


@dataclass(frozen=True)
class PassContext:
    """What passes read besides the IR: the model's adapters and edits in declaration
    order, each with the technique's checked arguments (`AdapterUse.args`)."""

    adapters: tuple[AdapterUse, ...] = ()
    edits: tuple[EditUse, ...] = ()  # share, prune and quantize statements in declaration order


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    after: tuple[str, ...]


@dataclass(frozen=True)
class PassReport:
    """(pass name, rewrites) in the order the passes ran."""

    rewrites: tuple[tuple[str, int], ...]

    def count(self, name: str) -> int:
        return dict(self.rewrites)[name]


PASSES: dict[str, Pass] = {}


def register(name: str, after: tuple[str, ...] = ()) -> Callable[[PassFn], PassFn]:
    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass '{name}' is registered twice")
        PASSES[name] = Pass(name, fn, tuple(after))
        return fn
    return wrap


def check_order(names: list[str]) -> None:
    for i, name in enumerate(names):
        if name not in PASSES:
            raise PassOrderError(f"unknown pass '{name}' (registered: {', '.join(sorted(PASSES))})")
        if name in names[:i]:
            raise PassOrderError(f"pass '{name}' appears twice in the pass list")
        late = [a for a in PASSES[name].after if a in names[i + 1:]]
        if late:
            raise PassOrderError(f"pass '{name}' must run after {', '.join(late)}, but comes before it")


def run_passes(ir: IR, names: list[str], ctx: PassContext,
               verify_each: bool = False) -> tuple[IR, PassReport]:
    """Run the passes in order. With `verify_each`, the IR is verified after every pass
    and a broken invariant is reported as an internal error of the pass that broke it."""
    names = list(names)
    check_order(names)
    done: list[tuple[str, int]] = []
    for name in names:
        try:
            ir, n = PASSES[name].fn(ir, ctx)
            if verify_each:
                verify(ir)
        except Exception as e:
            raise InternalError(f"internal error in pass {name} after [{', '.join(p for p, _ in done)}]: "
                                f"{type(e).__name__}: {e}") from e
        done.append((name, n))
    return ir, PassReport(tuple(done))


# One pass a module; importing them registers them (after the registry above exists).
from effc.compiler.passes import apply_adapters, assign_roles, compress  # noqa: E402,F401
