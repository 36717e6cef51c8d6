"""apply_<kind>: one pass per adapter kind (`effc.compiler.adapters`), e.g. apply_lora.

For each `adapt ... with <kind>(...)` the pass adds, to every target LINEAR it names, the
node the kind makes (params trainable, role "adapter"): it reads the target's input and
feeds the target. A target's adapters take its ports in declaration order, whichever
pass added them: the node id ends in the adapter's declaration index (`q.lora0`,
`k.ia3_2`), which keeps two adapters on one weight apart and orders them. Then the base
is frozen: a model with adapters trains only them. A rewrite is one adapter node added
or one base param frozen.
"""

from __future__ import annotations

from effc.compiler.adapters import KINDS, AdapterKind, adapter_id, adapter_index
from effc.compiler.ir import ADAPTERS, IR, IRError, Op
from effc.compiler.passes import PassContext, register
from effc.compiler.passes.assign_roles import set_trainable

def apply_kind(kind: AdapterKind, ir: IR, ctx: PassContext) -> tuple[IR, int]:
    added: dict[str, list] = {}  # target id -> its new nodes, in declaration order
    for i, use in enumerate(ctx.adapters):
        if use.technique != kind.name:
            continue
        for path in sorted(use.paths):
            target = ir.node(path)
            if target.op is not Op.LINEAR:
                raise IRError(f"{kind.name} target '{path}' is a {target.op.value}, not a linear layer")
            try:
                node = kind.make(target, adapter_id(target.id, kind.name, i), use.args, use.span)
            except KeyError as e:
                raise IRError(f"{kind.name} adapter {i} (at {use.span}) has no {e.args[0]}") from None
            added.setdefault(path, []).append(node)
    if not added:
        return ir, 0
    edges = [e for e in ir.edges() if not (e[1] in added and e[2] > 0)]
    for path, new in added.items():
        x = ir.inputs(path)[0]
        old = [ir.node(s) for s in ir.inputs(path)[1:]]
        edges += [(x, n.id, 0) for n in new]
        ordered = sorted(old + new, key=lambda n: adapter_index(n.id))
        edges += [(n.id, path, port) for port, n in enumerate(ordered, 1)]
    # Each adapter node sits just before its target, so dumps read in program order.
    nodes = []
    for n in ir.nodes():
        if n.op in ADAPTERS and n.attrs.target in added:
            continue  # re-placed with its target's other adapters below
        if n.id in added:
            old = [ir.node(s) for s in ir.inputs(n.id)[1:]]
            nodes += sorted(old + added[n.id], key=lambda m: adapter_index(m.id))
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
