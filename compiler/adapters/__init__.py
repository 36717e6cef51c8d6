"""Adapter kinds: one module each, and the contract every kind keeps.

An adapter is an IR node beside the node it adapts (its *target*: a LINEAR, or for the
kinds that say so an EMBEDDING): it reads one node's output (its *source*, port 0;
by default the target's own input, none for an embedding) and feeds the target at the
next free port, so the IR, the dumps and the cost model see it like any other node. The
op of a kind's nodes is named after its module (`compiler/adapters/dora.py` ->
`Op.DORA`, "dora"), and importing this package registers every module in it: adding an
adapter kind is adding one file here (plus the signature users type, an entry in
`effc.lang.registry.ADAPTERS`, since the language front end never imports the compiler).

A kind module defines one `AdapterKind` subclass and calls `register(...)` on an
instance. It declares, in one place:

- `attrs`: its frozen IR attrs record (it always has `target`, the target node's id);
- `target_ops`: the ops it may adapt (LINEAR unless it says otherwise); `target(ir,
  path)`: the IR node a selected module path attaches to (the path itself by default;
  a bottleneck on `layers[0].mlp` adapts the MLP's output projection `layers[0].mlp.down`);
- `make(target, id, args, span, ir)`: the node it adds for one target, with its params
  (`ParamRecord`s with role "adapter", trainable unless the kind freezes one) and its
  output shape; `build(ir, targets, index, args, span)` makes the nodes of one adapt
  statement (one `make` per target by default; a kind whose targets share params, such
  as MoS's shard pools, builds them together and ties the copies with `tied_to`);
- `source(ir, node)`: the node port 0 reads (default: the target's input; None for an
  embedding, whose input is the token ids, `b.tokens`);
- `check(node, target)`: the param and output shapes `verify` expects, from the attrs;
- the computation, as plain torch functions that are also the kind's references:
  `lower(b, node, x)` emits the node's own value from the source's output x (LoRA: the
  scaled update s·B·A·x); the target then computes `after(b, node, value, before(b,
  node, value, x) @ W^T + bias)` (an embedding: `after(b, node, value, W[tokens])`).
  `before` changes the input the base matmul reads (default: unchanged), `after`
  changes its output (default: adds the value). `b` is the fx builder of
  `effc.compiler.to_fx` (`Lowering`: `call`, `param`, `linear`, `dropout`, `constant`
  for index tensors a kind derives from its attrs, and `tokens`);
- `prefix(node)`: positions the adapter prepends to every sequence (soft prompts); the
  graph extends attention, positions and packing over them and drops them before the
  loss, so the outputs keep the input's length;
- `additive`: True when the kind only adds an update computed from its source (LoRA):
  such adapters compose with each other on one weight, summed in declaration order. A
  kind that rescales or replaces the target's output or part of its weight (DoRA, IA3,
  PaCA; a soft prompt, which changes the sequence) must be the only
  adapter on its weight (the checker says so, E0209), so every composition is exact;
- `init(node, leaf, t, g, args, base)`: the value of a fresh param, filling `t` from
  generator `g` (args: the technique's checked arguments; base: the target's params
  by leaf name, already loaded). A param with storage "generated" (NOLA's random bases)
  is never stored: it is made again by `init` from the kind's own seed whenever a graph
  is built, so it must not depend on `g`. An init may rewrite the target's weight in
  place when the method says so (PiSSA's residual weight);
- `merge(node, params, weight, bias)`: the target's (weight, bias) with the adapter
  folded in, in their dtype, the update computed in float64 (`params` by leaf name,
  generated ones excluded; bias may be None); returning the weight object itself
  leaves it as it was (a tied weight stays tied); a kind that cannot merge raises
  `CannotMerge` with the reason;
- cost (`effc.compiler.cost`): `saved(ir, node, rg)` -> (ids of IR outputs it saves
  for backward, bytes per token of tensors private to it, those of its `after` and
  `before` included); `saved_per_step(ir, node, rg)` -> bytes it saves once a step
  (a low-rank matrix assembled from shared or generated parts); `forward_temporaries(ir,
  node)` -> floats per token its forward allocates besides its value; `flops(ir, node, rg)` -> (forward, backward) per token.

Kind modules import no torch at module level (checking and costing never load it):
the torch functions use tensor methods, and the fx builder hands them `F.linear`.
"""

from __future__ import annotations

import importlib
import operator
import pkgutil

from effc.compiler.ir import IR, Node, Op, ParamRecord  # ir imports this package only lazily


class CannotMerge(Exception):
    """An adapter whose update has no exact fold into its base weight."""


class AdapterKind:
    name: str = ""
    attrs: type = object
    additive: bool = True
    target_ops: frozenset = frozenset({Op.LINEAR})

    # ---------------------------------------------------------- the IR

    def target(self, ir: IR, path: str) -> str:
        return path

    def make(self, target: Node, id: str, args: dict, span, ir: IR) -> Node:
        raise NotImplementedError

    def build(self, ir: IR, targets: list[Node], index: int, args: dict, span) -> list[Node]:
        return [self.make(t, adapter_id(t.id, self.name, index), args, span, ir) for t in targets]

    def source(self, ir: IR, node: Node) -> str | None:
        target = ir.node(node.attrs.target)
        return ir.inputs(target.id)[0] if target.op is Op.LINEAR else None

    def prefix(self, node: Node) -> int:
        return 0

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

    def saved_per_step(self, ir: IR, node: Node, rg: dict[str, bool]) -> int:
        """Bytes its backward keeps once a step whatever the batch (NOLA's mixed A and B)."""
        return 0

    def flops(self, ir: IR, node: Node, rg: dict[str, bool]) -> tuple[int, int]:
        """Matmul FLOPs: 2 per element of each matrix param forward; backward 2 more for
        the input gradient (when the input needs one) and 2 for a trainable matrix."""
        mats = [p for p in node.params if len(p.shape) == 2]
        w = sum(p.numel for p in mats)
        source = ir.inputs(node.id)
        bwd = 2 * w * bool(source and rg[source[0]]) + 2 * sum(p.numel for p in mats if p.trainable)
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
    return [m for m in map(ir.node, ir.inputs(target)) if m.op in ADAPTERS and m.attrs.target == target]


def base_inputs(ir: IR, target: str) -> list[str]:
    """The inputs of a node that are not its adapters (a LINEAR's x; none for an EMBEDDING)."""
    from effc.compiler.ir import ADAPTERS
    return [i for i in ir.inputs(target) if not (ir.node(i).op in ADAPTERS and ir.node(i).attrs.target == target)]


def prefix_length(ir: IR) -> int:
    """Positions the model's adapters prepend to every sequence (soft prompts)."""
    from effc.compiler.ir import ADAPTERS
    return sum(kind_of(n).prefix(n) for n in ir.nodes() if n.op in ADAPTERS)


def _load_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


_load_all()
