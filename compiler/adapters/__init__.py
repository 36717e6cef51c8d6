"""Adapter kinds: one module each, and the contract every kind keeps.

An adapter is an IR node beside the LINEAR it adapts (its *target*): it reads the
target's input (port 0) and feeds the target at the next free port, so the IR, the
dumps and the cost model see it like any other node. The op of a kind's nodes is named
after its module (`compiler/adapters/dora.py` -> `Op.DORA`, "dora"), and importing this
package registers every module in it: adding an adapter kind is adding one file here
(plus the signature users type, an entry in `effc.lang.registry.ADAPTERS`, since the
language front end never imports the compiler).

A kind module defines one `AdapterKind` subclass and calls `register(...)` on an
instance. It declares, in one place:

- `attrs`: its frozen IR attrs record (it always has `target`, the LINEAR's id);
- `make(target, id, args, span)`: the node it adds for one target, with its params
  (`ParamRecord`s with role "adapter", trainable) and its output shape;
- `check(node, target)`: the param and output shapes `verify` expects, from the attrs;
- the computation, as plain torch functions that are also the kind's references:
  `lower(b, node, x)` emits the node's own value from the target's input x (LoRA: the
  scaled update s·B·A·x); the target then computes `after(b, node, value, before(b,
  node, value, x) @ W^T + bias)`. `before` changes the input the base matmul reads
  (default: unchanged), `after` changes its output (default: adds the value). `b` is the
  fx builder of `effc.compiler.to_fx` (`Lowering`);
- `additive`: True when the kind only adds an update computed from the target's
  input (LoRA): such adapters compose with each other on one weight, summed in
  declaration order. A kind that rescales the weight (DoRA, IA3) must be the only
  adapter on its weight (the checker says so, E0209), so every composition is exact;
- `init(node, leaf, t, g, args, base)`: the value of a fresh param, filling `t` from
  generator `g` (args: the technique's checked arguments; base: the target's params
  by leaf name, already loaded);
- `merge(node, params, weight, bias)`: the target's (weight, bias) with the adapter
  folded in, in their dtype, the update computed in float64 (`params` by leaf name;
  bias may be None); a kind that cannot merge raises `CannotMerge` with the reason;
- cost (`effc.compiler.cost`): `saved(ir, node, rg)` -> (ids of IR outputs it saves
  for backward, bytes per token of tensors private to it, those of its `after` and
  `before` included); `forward_temporaries(ir, node)` -> floats per token its forward
  allocates besides its value; `flops(ir, node, rg)` -> (forward, backward) per token.

Kind modules import no torch at module level (checking and costing never load it):
the torch functions use tensor methods, and the fx builder hands them `F.linear`.
"""

from __future__ import annotations

import importlib
import operator
import pkgutil

from effc.compiler.ir import IR, Node, ParamRecord  # ir imports this package only lazily


class CannotMerge(Exception):
    """An adapter whose update has no exact fold into its base weight."""


class AdapterKind:
    name: str = ""
    attrs: type = object
    additive: bool = True

    # ---------------------------------------------------------- the IR

    def make(self, target: Node, id: str, args: dict, span) -> Node:
        raise NotImplementedError

    def check(self, node: Node, target: Node) -> tuple[tuple, list[tuple[int, ...]]]:
        """(the output shape, the param shapes in order) that node's attrs imply."""
        raise NotImplementedError

    # ---------------------------------------------------------- the computation

    def lower(self, b, node: Node, x):
        raise NotImplementedError

    def before(self, b, node: Node, value, x):
        return x

    def after(self, b, node: Node, value, y):
        return b.call(operator.add, y, value)

    # ---------------------------------------------------------- the runtime

    def init(self, node: Node, leaf: str, t, g, args: dict, base: dict):
        raise NotImplementedError

    def merge(self, node: Node, params: dict, weight, bias):
        raise CannotMerge(f"{self.name} adapters cannot be merged")

    # ---------------------------------------------------------- cost

    def saved(self, ir: IR, node: Node, rg: dict[str, bool]) -> tuple[set[str], int]:
        return set(), 0

    def forward_temporaries(self, ir: IR, node: Node) -> int:
        return 0

    def flops(self, ir: IR, node: Node, rg: dict[str, bool]) -> tuple[int, int]:
        """Matmul FLOPs: 2 per element of each matrix param forward; backward 2 more for
        the input gradient (when the input needs one) and 2 for a trainable matrix."""
        mats = [p for p in node.params if len(p.shape) == 2]
        w = sum(p.numel for p in mats)
        bwd = 2 * w * rg[ir.inputs(node.id)[0]] + 2 * sum(p.numel for p in mats if p.trainable)
        return 2 * w, bwd


KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    if kind.name in KINDS:
        raise ValueError(f"adapter kind '{kind.name}' is registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_of(node: Node) -> AdapterKind:
    return KINDS[node.op.value]


def adapter_id(target: str, kind: str, index: int) -> str:
    """The node id of the adapter declared `index`-th (among all of the model's adapt
    statements) on `target`: `layers[0].attn.q.lora0`, `layers[0].attn.k.ia3_2` (a kind
    whose name ends in a digit gets an underscore). The index orders a weight's adapters."""
    return f"{target}.{kind}{'_' if kind[-1].isdigit() else ''}{index}"


def adapter_index(id: str) -> int:
    return int(id[len(id.rstrip("0123456789")):])


def adapter_param(id: str, leaf: str, shape: tuple[int, ...]) -> ParamRecord:
    return ParamRecord(f"{id}.{leaf}", shape, "adapter")


def adapters_of(ir: IR, target: str) -> list[Node]:
    """The adapter nodes of one target, in port (declaration) order."""
    from effc.compiler.ir import ADAPTERS
    return [ir.node(i) for i in ir.inputs(target)[1:] if ir.node(i).op in ADAPTERS]


def _load_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


_load_all()
