"""share_layers, prune_structure, drop_sublayers, share_adapters, prune_weights,
quantize_linear: the compression edits.

Each reads the model's `share`, `prune` and `quantize` statements declared so far
(`PassContext.edits`, checked for order by `effc.lang.compress`) and rewrites param
records only: which tensors exist, their shapes, dtypes and storage. The weights
themselves change at run time (`effc.runtime.compress`), when the statement executes.

- share_layers (Bae et al. 2024, Relaxed Recursive Transformers): N consecutive layers
  become K blocks, layer i using block i mod K; the first K layers hold the blocks, and
  every param of a later layer is tied to its block's (storage "shared"), so it is
  stored once, counted once and its gradient is the sum over its uses. `tie A with B`
  ties A's params to B's the same way.
- share_adapters: a shared-scope adapter on a shared layer is tied to the same
  statement's adapter on the block, so the loops share it; a per-loop one
  (`per_loop=true`) keeps its own params.
- prune_structure, drop_sublayers: removed heads, channels and whole sublayers leave the
  IR (see each pass).
- prune_weights: a pruned weight stays dense, with storage "sparse(50%)" or
  "sparse(2:4)": its zeros are kept through later training and merges.
- quantize_linear: a quantized LINEAR holds the packed tensors of its scheme instead of
  its weight (int8: qweight, scale; int4: qweight, scale, zero; nf4: qweight and absmax,
  or absmax_q, absmax_scale, absmax_mean with double quantization), frozen.

A rewrite is one param record changed or replaced.
"""

from __future__ import annotations

import re
from dataclasses import replace

from effc.compiler.adapters import adapter_index
from effc.compiler.ir import ADAPTERS, IR, Node, Op, ParamRecord, packed_params
from effc.compiler.passes import PassContext, register
from effc.compiler.passes.apply_adapters import APPLY


def _layer(path: str) -> tuple[str, int] | None:
    m = re.match(r"layers\[(\d+)\]", path)
    return (m.group(0), int(m.group(1))) if m else None


@register("share_layers")
def share_layers(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    block_of: dict[str, str] = {}  # module path -> the module holding its params (a block, a tie's source)
    for e in ctx.edits:
        if e.verb == "share":
            first, k = _layer(e.paths[0])[1], e.args["blocks"]
            for j in range(k, len(e.paths)):
                block_of[f"layers[{first + j}]"] = f"layers[{first + j % k}]"
        if e.verb == "tie":  # `tie A with B`: A's params read B's, module by module
            block_of.update(zip(e.paths, e.args["source"]))

    def owner(path: str) -> str | None:
        """The tied or looped module a param path lies in (the longest match)."""
        hits = [m for m in block_of if path.startswith(m + ".")]
        return max(hits, key=len) if hits else None

    def tie(p: ParamRecord) -> ParamRecord:
        m = owner(p.path)
        if m is None or p.tied_to:
            return p
        return replace(p, tied_to=block_of[m] + p.path[len(m):], storage="shared")

    return ir.map_params(tie)


@register("share_adapters", after=("share_layers", *APPLY))
def share_adapters(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    updated, changed = [], 0
    for n in ir.nodes():
        if n.op not in ADAPTERS or ctx.adapters[adapter_index(n.id)].scope != "shared":
            continue
        w = ir.node(n.attrs.target).params[0]
        if w.storage != "shared":
            continue
        block = w.tied_to.rsplit(".", 1)[0]
        twin = block + n.id[len(n.attrs.target):]
        if twin not in ir:
            continue  # the block's own layer was not adapted: this loop's adapter is the group's only one
        params = tuple(p if p.tied_to or p.storage == "generated"
                       else replace(p, tied_to=twin + p.path[len(n.id):], storage="shared") for p in n.params)
        changed += sum(a != b for a, b in zip(params, n.params))
        updated.append(replace(n, params=params))
    return ir.with_nodes(updated), changed


def _resized(n: Node, out_features: int | None = None, in_features: int | None = None) -> Node:
    """A LINEAR with new widths: its weight (out, in) and bias (out) records follow."""
    a = n.attrs
    a = replace(a, out_features=out_features or a.out_features, in_features=in_features or a.in_features)
    shapes = [(a.out_features, a.in_features), (a.out_features,)]
    params = tuple(replace(p, shape=shape) for p, shape in zip(n.params, shapes))
    return replace(n, attrs=a, params=params, shape=n.shape[:-1] + (a.out_features,))


def _width(n: Node, width: int, **attrs) -> Node:
    return replace(n, attrs=replace(n.attrs, **attrs), shape=n.shape[:-1] + (width,))


@register("prune_structure", after=("share_layers",))
def prune_structure(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    """heads and channels: the removed units' rows and columns leave every tensor of the
    selected attentions and MLPs (the same count in each, so the shapes are static; which
    units go is decided by their weights at run time, effc.runtime.compress)."""
    updated: dict[str, Node] = {}
    node = lambda id: updated.get(id) or ir.node(id)  # noqa: E731
    for e in ctx.edits:
        if e.verb != "prune" or e.technique not in ("heads", "channels"):
            continue
        for p in [p for p in e.paths if f"{p}.core" in ir or f"{p}.down" in ir]:  # not a dropped one
            if e.technique == "heads":
                core = node(f"{p}.core").attrs
                n = round(e.args["fraction"] * core.kv_heads)
                kv = core.kv_heads - n
                heads = kv * (core.heads // core.kv_heads)
                q, kvw = heads * core.head_dim, kv * core.head_dim
                new = [_resized(node(f"{p}.q"), out_features=q), _resized(node(f"{p}.k"), out_features=kvw),
                       _resized(node(f"{p}.v"), out_features=kvw), _resized(node(f"{p}.o"), in_features=q),
                       _width(node(f"{p}.core"), q, heads=heads, kv_heads=kv)]
                if f"{p}.rope_q" in ir:
                    new += [_width(node(f"{p}.rope_q"), q, heads=heads), _width(node(f"{p}.rope_k"), kvw, heads=kv)]
            else:
                down = node(f"{p}.down")
                ffn = down.attrs.in_features - round(e.args["fraction"] * down.attrs.in_features)
                act = f"{p}.swiglu" if f"{p}.swiglu" in ir else f"{p}.act"
                new = [_resized(node(f"{p}.up"), out_features=ffn), _resized(down, in_features=ffn),
                       _width(node(act), ffn, dim=ffn)]
                if f"{p}.gate" in ir:
                    new.append(_resized(node(f"{p}.gate"), out_features=ffn))
            updated.update({n.id: n for n in new})
    return ir.with_nodes(updated.values()), len(updated)


def dropped_layers(edit) -> list[str]:
    """The layers whose sublayer a drop_sublayers statement removes: what the run chose
    (`args["dropped"]`, set when the statement executes), else the last `count` selected
    layers, which cost exactly the same (every block has one shape) until the run decides."""
    return edit.args.get("dropped") or list(edit.paths[-edit.args["count"]:])


@register("drop_sublayers", after=("prune_structure",))
def drop_sublayers(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    """A dropped sublayer's nodes (its norm, its ops, its residual add) leave the graph;
    whatever read the residual add reads the block's stream before it."""
    gone: dict[str, str] = {}  # removed residual add -> the stream it added to
    removed: set[str] = set()
    for e in ctx.edits:
        if e.technique != "drop_sublayers":
            continue
        k = e.args["kind"]
        for layer in dropped_layers(e):
            add = f"{layer}.{k}_residual"
            gone[add] = ir.inputs(add)[0]
            removed |= {n.id for n in ir.nodes() if n.id.startswith((f"{layer}.{k}.", f"{layer}.{k}_"))}
    if not removed:
        return ir, 0

    def stream(id: str) -> str:
        while id in gone:
            id = gone[id]
        return id

    edges = [(stream(a), b, port) for a, b, port in ir.edges() if b not in removed and (a not in removed or a in gone)]
    return IR.build([n for n in ir.nodes() if n.id not in removed], edges), len(removed)


def sparse_storage(args: dict, technique: str) -> str:
    if args.get("n") is not None:
        return f"sparse({args['n']}:{args['m']})"
    scope = " global" if args.get("scope") == "global" else ""
    return f"sparse({100 * args['sparsity']:g}%{scope})"


@register("prune_weights", after=("share_adapters",))
def prune_weights(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    storage: dict[str, str] = {}
    for e in ctx.edits:
        if e.verb == "prune" and e.technique not in ("heads", "channels", "drop_sublayers"):
            for path in [p for p in e.paths if p in ir]:  # a dropped sublayer's weights are gone
                w = ir.node(path).params[0]
                storage[w.tied_to or w.path] = sparse_storage(e.args, e.technique)
    # a loop of a shared block keeps storage "shared": the block's own record says sparse
    return ir.map_params(lambda p: replace(p, storage=storage[p.path]) if p.tied_to is None and p.path in storage else p)


def qat_node(n: Node, args: dict) -> Node:
    """QAT (LSQ): the dense weight stays (storage "qat(...)") and gains a learned step per
    (row, group) of input columns, which always trains."""
    a, w = n.attrs, n.params[0]
    storage = f"qat(bits={args['bits']}, group={args['group']})"
    step = ParamRecord(f"{n.id}.step", (a.out_features, a.in_features // args["group"]), w.role, storage=storage)
    return replace(n, attrs=replace(a, quant="qat", group=args["group"], bits=args["bits"]),
                   params=(replace(w, storage=storage), step) + n.params[1:])


def quantize_node(n: Node, scheme: str, args: dict) -> Node:
    a, w = n.attrs, n.params[0]
    dq = scheme == "nf4" and args["double_quant"]
    packed = packed_params(n.id, a.out_features, a.in_features, scheme, args.get("group", 0), dq, w.role)
    if w.tied_to:  # a loop of a shared block reads the block's packed tensors
        block = w.tied_to.rsplit(".", 1)[0]
        packed = tuple(replace(p, tied_to=block + p.path[len(n.id):]) for p in packed)
    return replace(n, attrs=replace(a, quant=scheme, group=args.get("group", 0), double_quant=dq),
                   params=packed + n.params[1:])


@register("quantize_linear", after=("prune_weights",))
def quantize_linear(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    updated = {}
    for e in ctx.edits:
        if e.verb == "quantize":
            for path in [p for p in e.paths if p in ir]:
                n = ir.node(path)
                if n.op is Op.LINEAR and not n.attrs.quant:
                    updated[path] = qat_node(n, e.args) if e.technique == "qat" else quantize_node(n, e.technique, e.args)
    changed = sum(len(n.params) for n in updated.values())
    return ir.with_nodes(updated.values()), changed
