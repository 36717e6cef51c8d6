"""The IR's invariants, stated once and checked after every pass in tests.

`verify(ir)` raises `IRError` naming the node and the broken rule:
- the graph is acyclic and every node's attrs record is the one its op declares;
- every input's feature width (last dim) is what the op expects at that port, and the
  node's own output width is what its attrs say (so consecutive shapes agree);
- param shapes agree with attrs (a linear weight is (out, in), LoRA A (rank, in) and
  B (out, rank)), and roles are known;
- an adapter node adapts a node of an op its kind allows (a LINEAR, or an EMBEDDING),
  reads exactly its kind's source (`AdapterKind.source`: the target's input by default)
  and feeds only its target, and its output and param shapes are what its kind says
  (`AdapterKind.check`); a LINEAR's inputs after port 0, and an EMBEDDING's inputs, are
  its own adapters;
- param paths are unique; a tied param names an existing untied param of the same shape;
- there is at least one output (a LOSS, or an encoder's POOL).
"""

from __future__ import annotations

import networkx as nx

from effc.compiler.ir import ADAPTERS, IR, OUTPUTS, ROLES, IRError, Node, Op, attrs_type, packed_params


def verify(ir: IR) -> None:
    g = ir.graph
    if not nx.is_directed_acyclic_graph(g):
        raise IRError(f"the IR has a cycle: {nx.find_cycle(g)}")
    nodes = ir.nodes()
    for n in nodes:
        _check_node(ir, n)
    _check_params(nodes)
    if not any(n.op in OUTPUTS for n in nodes):
        raise IRError("the IR has no LOSS or POOL node: nothing to train or evaluate")


def _fail(n: Node, msg: str) -> None:
    raise IRError(f"node '{n.id}' ({n.op.value}): {msg}")


def _widths(n: Node) -> tuple[list[int], int | None, list[tuple[int, ...]]]:
    """What the op expects: input widths by port, its output width (None: a scalar),
    and its param shapes in order."""
    a = n.attrs
    if n.op is Op.EMBEDDING:
        return [], a.dim, [(a.vocab, a.dim)]
    if n.op is Op.POSITION:
        return [a.dim], a.dim, [(a.rows, a.dim)]
    if n.op is Op.RMSNORM:
        return [a.dim], a.dim, [(a.dim,)]
    if n.op is Op.LAYERNORM:
        return [a.dim], a.dim, [(a.dim,), (a.dim,)]
    if n.op is Op.LINEAR:
        bias = [(a.out_features,)] if a.bias else []
        weight = [(a.out_features, a.in_features)]
        if a.quant == "qat":  # the dense weight and its step per (row, group)
            weight.append((a.out_features, a.in_features // a.group))
        elif a.quant:
            weight = [p.shape for p in packed_params(n.id, a.out_features, a.in_features, a.quant, a.group,
                                                    a.double_quant, "")]
        return [a.in_features], a.out_features, weight + bias
    if n.op in (Op.GELU, Op.POOL):
        return [a.dim], a.dim, []
    if n.op is Op.ROTARY:
        return [a.heads * a.head_dim], a.heads * a.head_dim, []
    if n.op is Op.ATTENTION_CORE:
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        return [q, kv, kv], q, []
    if n.op in (Op.SWIGLU, Op.RESIDUAL_ADD):
        return [a.dim, a.dim], a.dim, []
    return [a.vocab], None, []  # LOSS


def _check_node(ir: IR, n: Node) -> None:
    want = attrs_type(n.op)
    if not isinstance(n.attrs, want):
        _fail(n, f"attrs are {type(n.attrs).__name__}, expected {want.__name__}")
    if n.op in ADAPTERS:
        return _check_adapter(ir, n)
    ins, out, shapes = _widths(n)
    srcs = ir.inputs(n.id)
    if n.op in (Op.LINEAR, Op.EMBEDDING):  # its own inputs, then its adapters (each checks its own value)
        own = len(ins)
        for s in srcs[own:]:
            if ir.node(s).op not in ADAPTERS or ir.node(s).attrs.target != n.id:
                _fail(n, f"input '{s}' after port {own - 1} is not an adapter of this {n.op.value}")
        srcs = srcs[:own]
    _check_inputs(ir, n, srcs, ins)
    if n.op is Op.POOL:  # one vector per sequence
        if n.shape != ("B", out):
            _fail(n, f"output shape {n.shape}, expected ('B', {out})")
    else:
        _check_output(n, out)
    got = [p.shape for p in n.params]
    if got != shapes:
        _fail(n, f"param shapes {got} do not match the attrs, which need {shapes}")


def _check_inputs(ir: IR, n: Node, srcs: list[str], widths: list[int]) -> None:
    if len(srcs) != len(widths):
        _fail(n, f"has {len(srcs)} inputs, expected {len(widths)}")
    for port, (src, w) in enumerate(zip(srcs, widths)):
        shape = ir.node(src).shape
        if not shape or shape[-1] != w:
            _fail(n, f"input {port} from '{src}' has shape {shape}, expected width {w}")


def _check_output(n: Node, width: int | None) -> None:
    want = () if width is None else ("B", "T", width)
    if n.shape != want:
        _fail(n, f"output shape {n.shape}, expected {want}")


def _check_adapter(ir: IR, n: Node) -> None:
    from effc.compiler.adapters import kind_of
    a, kind = n.attrs, kind_of(n)
    target = ir.node(a.target) if a.target in ir else None
    if target is None or target.op not in kind.target_ops:
        allowed = " or ".join(sorted(op.value.upper() for op in kind.target_ops))
        _fail(n, f"its target '{a.target}' is not a {allowed} node")
    if ir.outputs(n.id) != [target.id]:
        _fail(n, f"must feed exactly its target '{target.id}', feeds {ir.outputs(n.id)}")
    src = kind.source(ir, n)
    if ir.inputs(n.id) != ([] if src is None else [src]):
        _fail(n, f"must read {'nothing' if src is None else repr(src)}, reads {ir.inputs(n.id)}")
    shape, want = kind.check(n, target)
    if n.shape != shape:
        _fail(n, f"output shape {n.shape}, expected {shape}")
    got = [p.shape for p in n.params]
    if got != want:
        leaves = [p.path.rsplit(".", 1)[-1] for p in n.params]
        named = " and ".join(f"{leaf} {w}" for leaf, w in zip(leaves, want)) if len(leaves) == len(want) else want
        _fail(n, f"param shapes {got}, expected {named}")


def _check_params(nodes: list[Node]) -> None:
    by_path = {}
    for n in nodes:
        for p in n.params:
            if p.path in by_path:
                _fail(n, f"param path '{p.path}' is also used by '{by_path[p.path][0].id}'")
            if p.role not in ROLES:
                _fail(n, f"param '{p.path}' has unknown role '{p.role}'")
            by_path[p.path] = (n, p)
    for n, p in by_path.values():
        if p.tied_to is None:
            continue
        owner = by_path.get(p.tied_to)
        if owner is None or owner[1].tied_to is not None:
            _fail(n, f"param '{p.path}' is tied to '{p.tied_to}', which is not an untied param")
        if owner[1].shape != p.shape:
            _fail(n, f"param '{p.path}' {p.shape} is tied to '{p.tied_to}' of shape {owner[1].shape}")
        if owner[1].trainable != p.trainable:
            _fail(n, f"param '{p.path}' and '{p.tied_to}' share storage but disagree on trainable")
