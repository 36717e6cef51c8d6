"""apply_lora: add a LoRA update to every linear weight an `adapt ... with lora(...)` names.

For each target LINEAR `W` (out, in) the pass adds a LORA node with A (rank, in) and
B (out, rank), trainable, role "adapter", that reads W's input and feeds W at its next
port, so the layer computes x W^T + (alpha / rank) * dropout(x) A^T B^T (Hu et al. 2021,
arXiv:2106.09685). Adapters on one weight keep declaration order. Then the base is
frozen: a LoRA model trains only its adapters. A rewrite is one LORA node added or one
base param frozen.
"""

from __future__ import annotations

from effc.compiler.ir import IR, IRError, LoraAttrs, Node, Op, ParamRecord
from effc.compiler.passes import PassContext, register
from effc.compiler.passes.assign_roles import set_trainable


def _lora_node(target: Node, index: int, args, span) -> Node:
    t = target.attrs
    rank = args["rank"]
    alpha = args.get("alpha") or rank  # the checker fills alpha=rank; hand-built uses may not
    id = f"{target.id}.lora{index}"  # the adapter's index keeps two adapters on W apart
    params = (ParamRecord(f"{id}.A", (rank, t.in_features), "adapter"),
              ParamRecord(f"{id}.B", (t.out_features, rank), "adapter"))
    attrs = LoraAttrs(rank, float(alpha), float(args.get("dropout", 0.0)), target.id)
    return Node(id, Op.LORA, attrs, params, span, target.shape)


@register("apply_lora")
def apply_lora(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    before: dict[str, list[Node]] = {}  # target id -> its new LORA nodes, in order
    edges = ir.edges()
    for i, use in enumerate(ctx.adapters):
        if use.technique != "lora":
            continue
        if "rank" not in use.args:
            raise IRError(f"lora adapter {i} (at {use.span}) has no rank")
        for path in sorted(use.paths):
            target = ir.node(path)
            if target.op is not Op.LINEAR:
                raise IRError(f"lora target '{path}' is a {target.op.value}, not a linear layer")
            node = _lora_node(target, i, use.args, use.span)
            port = len(ir.inputs(path)) + len(before.get(path, []))
            edges += [(ir.inputs(path)[0], node.id, 0), (node.id, path, port)]
            before.setdefault(path, []).append(node)
    if not before:
        return ir, 0
    # Each LORA node sits just before its target, so dumps read in program order.
    nodes = [m for n in ir.nodes() for m in (*before.get(n.id, ()), n)]
    ir, frozen = set_trainable(IR.build(nodes, edges))
    return ir, sum(map(len, before.values())) + frozen
