"""apply_<kind>: one pass per adapter kind (`effc.compiler.adapters`), e.g. apply_lora.

For each `adapt ... with <kind>(...)` the pass adds the nodes the kind builds for the
targets it names (a LINEAR, or the node the kind attaches a selected module to; params
role "adapter"): each reads its source (the target's input unless the kind says
otherwise) and feeds its target. A target's adapters take its ports after its own
inputs, in declaration order, whichever pass added them: the node id ends in the
adapter's declaration index (`q.lora0`, `k.ia3_2`), which keeps two adapters on one
weight apart and orders them. Then the base is frozen: a model with adapters trains only
them. A rewrite is one adapter node added or one base param frozen.
"""

from __future__ import annotations

from effc.compiler.adapters import KINDS, AdapterKind, adapter_index, adapters_of, base_inputs
from effc.compiler.ir import IR, IRError
from effc.compiler.passes import PassContext, register
from effc.compiler.passes.assign_roles import set_trainable


def apply_kind(kind: AdapterKind, ir: IR, ctx: PassContext) -> tuple[IR, int]:
    added: dict[str, list] = {}  # target id -> its new nodes, in declaration order
    for i, use in enumerate(ctx.adapters):
        if use.technique != kind.name:
            continue
        targets = []
        for path in sorted(use.paths):
            if kind.target(ir, path) not in ir:
                continue  # in a sublayer that drop_sublayers removed: nothing left to adapt
            target = ir.node(kind.target(ir, path))
            if target.op not in kind.target_ops:
                raise IRError(f"{kind.name} target '{target.id}' is a {target.op.value}, which {kind.name} "
                              "does not adapt")
            targets.append(target)
        try:
            nodes = kind.build(ir, targets, i, use.args, use.span)
        except KeyError as e:
            raise IRError(f"{kind.name} adapter {i} (at {use.span}) has no {e.args[0]}") from None
        for node in nodes:
            added.setdefault(node.attrs.target, []).append(node)
    if not added:
        return ir, 0
    # Each target's adapters, old and new, take the ports after its own inputs in declaration order.
    order = {t: sorted(adapters_of(ir, t) + new, key=lambda n: adapter_index(n.id)) for t, new in added.items()}
    edges = [e for e in ir.edges() if not (e[1] in added and e[0] not in base_inputs(ir, e[1]))]
    for t, ordered in order.items():
        first = len(base_inputs(ir, t))
        edges += [(n.id, t, port) for port, n in enumerate(ordered, first)]
    for new in added.values():
        for n in new:
            src = kind.source(ir, n)
            if src is not None:
                edges.append((src, n.id, 0))
    # Each adapter node sits just before its target, so dumps read in program order.
    placed = {n.id for ordered in order.values() for n in ordered}
    nodes = []
    for n in ir.nodes():
        if n.id in placed:
            continue  # re-placed with its target's other adapters below
        if n.id in order:
            nodes += order[n.id]
        nodes.append(n)
    ir, frozen = set_trainable(IR.build(nodes, edges))
    return ir, sum(map(len, added.values())) + frozen


def _pass(kind: AdapterKind):
    def run(ir: IR, ctx: PassContext) -> tuple[IR, int]:
        return apply_kind(kind, ir, ctx)
    run.__name__ = f"apply_{kind.name}"
    run.__doc__ = f"Add the {kind.name} adapters declared so far (see this module's docstring)."
    return run


# LoRA first, then the other kinds by name: the order of the pipeline's pass list.
APPLY = [f"apply_{k}" for k in sorted(KINDS, key=lambda k: (k != "lora", k))]
for _name in APPLY:
    register(_name)(_pass(KINDS[_name.removeprefix("apply_")]))
