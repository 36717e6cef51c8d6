"""The IR: a data-flow graph of typed ops with parameter records and symbolic shapes.

A `networkx.DiGraph` behind a small API. Nodes are keyed by id (the canonical module path
for parametric nodes, e.g. `layers[0].attn.q`) and carry a frozen `Node` under the `node`
attribute; an edge `a -> b` with attribute `port` says that `a`'s output is input number
`port` of `b`. Activation shapes are symbolic in batch `B` and sequence `T`:
`("B", "T", 256)`. Every helper returns a new IR; no function here mutates an input.

Adapters are nodes too, one op per kind (`effc.compiler.adapters`): an adapter node
reads the same input as its target LINEAR (port 0) and feeds the LINEAR at port 1, 2,
... in declaration order; a LINEAR computes `x @ W.T` and lets each adapter change its
input or output in that order (LoRA adds its update: `x @ W.T + sum(updates)`).
"""

from __future__ import annotations

import enum
import json
import math
import os
import pkgutil
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Iterable, Union

import networkx as nx

from effc.lang.diagnostics import Span


def _adapter_kinds() -> list[str]:
    """One op per module of `compiler/adapters/` (see its docstring): adding an adapter
    kind is adding its module there, and its op is named after it."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapters")
    return sorted(m.name for m in pkgutil.iter_modules([folder]) if not m.name.startswith("_"))


_BASE_OPS = [
    "embedding",
    "position",  # x + a learned table's row per position (or row 0: token types)
    "rmsnorm", "layernorm", "linear", "rotary", "attention_core", "swiglu", "gelu",
    "residual_add", "loss",
    "pool",  # mean over the sequence's real tokens: an encoder's sentence embedding
]
Op = enum.Enum("Op", [(name.upper(), name) for name in _BASE_OPS + _adapter_kinds()])

ADAPTERS = frozenset(Op(k) for k in _adapter_kinds())
PARAMETRIC = frozenset({Op.EMBEDDING, Op.POSITION, Op.RMSNORM, Op.LAYERNORM, Op.LINEAR}) | ADAPTERS
NORMS = frozenset({Op.RMSNORM, Op.LAYERNORM})
OUTPUTS = frozenset({Op.LOSS, Op.POOL})  # what a graph ends in
# The ops whose FLOPs come from their weights: 2 per matrix element per token for a
# LINEAR; an adapter kind's cost hook counts its own (the low-rank kinds follow that rule).
MATMULS = frozenset({Op.LINEAR}) | ADAPTERS

QUANT_SCHEMES = ("int8", "int4", "nf4")  # packed storage; "qat" keeps a dense weight and a step
ROLES = ("embedding", "attention", "mlp", "norm", "head", "adapter")
BATCH, SEQ = "B", "T"
Dim = Union[int, str]


class IRError(Exception):
    """A broken IR invariant: always a compiler bug, never the user's mistake."""


@dataclass(frozen=True)
class ParamRecord:
    """One weight tensor. `tied_to` names the param whose storage this one reuses (a tied
    head reads the embedding's weight, a layer of a recursive share its block's): it is
    counted once and must have the same shape.

    `storage` says how the tensor is held: "dense"; "generated" (made again from a seed,
    never stored); "shared" (a recursive share's loop: tied to its block's param);
    "sparse(50%)" or "sparse(2:4)" (a pruned dense weight whose zeros stay zero);
    "int8", "int4(group=64)", "nf4(group=64)" (one tensor of a quantized weight's packed
    form, frozen: see effc.kernels.quant)."""

    path: str
    shape: tuple[int, ...]
    role: str
    dtype: str = "float32"
    trainable: bool = True
    storage: str = "dense"
    tied_to: str | None = None

    @property
    def quantized(self) -> bool:
        return self.storage.startswith(QUANT_SCHEMES)

    @property
    def elements(self) -> int:
        """Weights this record holds, as a parameter count: a packed int4/nf4 byte holds
        two, an int8 one; a quantized weight's scales and zero points hold none."""
        if not self.quantized:
            return self.numel
        return {"qweight": self.numel * (1 if self.dtype == "int8" else 2)}.get(self.path.rsplit(".", 1)[-1], 0)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def packed_params(path: str, out: int, inp: int, scheme: str, group: int, double_quant: bool,
                  role: str) -> tuple[ParamRecord, ...]:
    """The records of a quantized (out, in) weight: the canonical packed form of
    effc.kernels.quant, by scheme (`group` input columns per scale)."""
    if scheme == "int8":
        spec = [("qweight", (out, inp), "int8"), ("scale", (out,), "float32")]
        storage = "int8"
    else:
        g = group
        spec = [("qweight", (out, inp // 2), "uint8")]
        if scheme == "int4":
            spec += [("scale", (out, inp // g), "float32"), ("zero", (out, inp // g), "uint8")]
        elif double_quant:
            spec += [("absmax_q", (out, inp // g), "int8"), ("absmax_scale", (math.ceil(out * inp // g / 256),), "float32"),
                     ("absmax_mean", (1,), "float32")]
        else:
            spec += [("absmax", (out, inp // g), "float32")]
        storage = f"{scheme}(group={g})"
    return tuple(ParamRecord(f"{path}.{leaf}", shape, role, dtype, trainable=False, storage=storage)
                 for leaf, shape, dtype in spec)


# ---------------------------------------------------------------- attribute records, one per op


@dataclass(frozen=True)
class EmbeddingAttrs:
    vocab: int
    dim: int


@dataclass(frozen=True)
class PositionAttrs:
    rows: int
    dim: int
    kind: str  # "position": row t for the token at position t; "type": row 0 for every token


@dataclass(frozen=True)
class NormAttrs:
    dim: int
    eps: float


@dataclass(frozen=True)
class LinearAttrs:
    in_features: int
    out_features: int
    bias: bool = False
    # weight-only quantization (effc.kernels.quant): "" (dense) | "int8" | "int4" | "nf4", with
    # the input columns per scale (int4, nf4); the node's params are then the packed tensors
    quant: str = ""
    group: int = 0
    double_quant: bool = False  # nf4: the block scales are themselves stored in 8 bits
    bits: int = 0  # qat: the fake-quantized weight's bits (quant="qat": the weight stays dense)


@dataclass(frozen=True)
class RotaryAttrs:
    heads: int  # heads of the rotated tensor (query heads for q, key/value heads for k)
    head_dim: int
    theta: float
    # frequency rescaling (effc.lang.tree.RopeScaling): "none" | "linear" | "llama3"
    scaling: str = "none"
    factor: float = 1.0
    low_freq: float = 1.0
    high_freq: float = 4.0
    original_seq: int = 0


@dataclass(frozen=True)
class AttentionAttrs:
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True


@dataclass(frozen=True)
class GeluAttrs:
    dim: int
    approximate: str  # "none" (erf, BERT) | "tanh" (GPT-2's gelu_new)


@dataclass(frozen=True)
class PoolAttrs:
    dim: int


@dataclass(frozen=True)
class SwigluAttrs:
    dim: int


@dataclass(frozen=True)
class ResidualAttrs:
    dim: int


@dataclass(frozen=True)
class LossAttrs:
    vocab: int


ATTRS = {
    Op.EMBEDDING: EmbeddingAttrs, Op.POSITION: PositionAttrs, Op.RMSNORM: NormAttrs,
    Op.LAYERNORM: NormAttrs, Op.LINEAR: LinearAttrs, Op.ROTARY: RotaryAttrs,
    Op.ATTENTION_CORE: AttentionAttrs, Op.SWIGLU: SwigluAttrs, Op.GELU: GeluAttrs,
    Op.RESIDUAL_ADD: ResidualAttrs, Op.LOSS: LossAttrs, Op.POOL: PoolAttrs,
}  # adapter ops' records come from their kinds: see attrs_type


@dataclass(frozen=True)
class Node:
    id: str
    op: Op
    attrs: object
    params: tuple[ParamRecord, ...]
    span: Span | None
    shape: tuple[Dim, ...]  # the output activation, symbolic in B and T


# ---------------------------------------------------------------- the graph


class IR:
    """A read-only view of a data-flow graph. Build one with `IR.build`."""

    def __init__(self, graph: nx.DiGraph):
        self._g = graph  # never changed after this: the orders below are computed once
        self._order: list[Node] | None = None
        self._inputs: dict[str, list[str]] = {}

    @staticmethod
    def build(nodes: Iterable[Node], edges: Iterable[tuple[str, str, int]]) -> "IR":
        """Nodes in the order they should appear among independent ones (the order
        `nodes()` breaks ties with), and edges (src, dst, port)."""
        g = nx.DiGraph()
        for n in nodes:
            g.add_node(n.id, node=n)
        for src, dst, port in edges:
            for end in (src, dst):
                if end not in g:
                    raise IRError(f"edge {src} -> {dst} names an unknown node '{end}'")
            g.add_edge(src, dst, port=port)
        return IR(g)

    @property
    def graph(self) -> nx.DiGraph:
        """A copy, so that callers (verify, drawing) can never change this IR."""
        return self._g.copy()

    def nodes(self) -> list[Node]:
        """Topological order; ties go to the earlier-built node, so the order is stable."""
        if self._order is None:
            rank = {n: i for i, n in enumerate(self._g.nodes)}
            order = nx.lexicographical_topological_sort(self._g, key=rank.__getitem__)
            self._order = [self._g.nodes[n]["node"] for n in order]
        return list(self._order)

    def node(self, id: str) -> Node:
        if id not in self._g:
            raise KeyError(f"no node '{id}' in the IR")
        return self._g.nodes[id]["node"]

    def __contains__(self, id: str) -> bool:
        return id in self._g

    def inputs(self, id: str) -> list[str]:
        """Producer ids in port order."""
        if id not in self._inputs:
            self._inputs[id] = [s for s, _ in sorted(self._g.in_edges(id), key=lambda e: self._g.edges[e]["port"])]
        return list(self._inputs[id])

    def outputs(self, id: str) -> list[str]:
        return sorted(self._g.successors(id))

    def edges(self) -> list[tuple[str, str, int]]:
        return [(s, d, p) for s, d, p in self._g.edges(data="port")]

    def params(self) -> list[ParamRecord]:
        """Every record in node order, tied aliases included (cost counts them once)."""
        return [p for n in self.nodes() for p in n.params]

    def with_nodes(self, updated: Iterable[Node]) -> "IR":
        """A new IR with the given nodes replacing those of the same id; edges kept."""
        new = {n.id: n for n in updated}
        unknown = set(new) - set(self._g.nodes)
        if unknown:
            raise IRError(f"with_nodes: unknown node ids {sorted(unknown)}")
        g = self._g.copy()
        for id, n in new.items():
            g.nodes[id]["node"] = n
        return IR(g)

    def map_params(self, fn) -> tuple["IR", int]:
        """A new IR with `fn` applied to every param record; also how many changed."""
        changed, updated = 0, []
        for n in self.nodes():
            params = tuple(fn(p) for p in n.params)
            changed += sum(a != b for a, b in zip(params, n.params))
            updated.append(replace(n, params=params))
        return self.with_nodes(updated), changed

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, IR) and self.nodes() == other.nodes()
                and sorted(self.edges()) == sorted(other.edges()))

    # ------------------------------------------------------------ serialisation

    def to_json(self) -> str:
        # Topological order: rebuilding in that order gives back the same `nodes()` order.
        nodes = [_node_to_dict(n) for n in self.nodes()]
        return json.dumps({"nodes": nodes, "edges": [list(e) for e in self.edges()]}, indent=1)

    @staticmethod
    def from_json(text: str) -> "IR":
        data = json.loads(text)
        return IR.build([_node_from_dict(d) for d in data["nodes"]],
                        [tuple(e) for e in data["edges"]])


def _node_to_dict(n: Node) -> dict:
    return {
        "id": n.id, "op": n.op.value, "attrs": asdict(n.attrs),
        "params": [asdict(p) for p in n.params],
        "span": list(n.span.key()) if n.span else None,
        "shape": list(n.shape),
    }


def _node_from_dict(d: dict) -> Node:
    op = Op(d["op"])
    params = tuple(ParamRecord(**{**p, "shape": tuple(p["shape"])}) for p in d["params"])
    return Node(d["id"], op, attrs_type(op)(**d["attrs"]), params,
                Span(*d["span"]) if d["span"] else None, tuple(d["shape"]))


# ---------------------------------------------------------------- text dump


def _fmt_attrs(attrs: object) -> str:
    """Every attribute without a default, and those with one where they differ from it
    (a linear's `bias=True`, a rotary's scaling), so dumps say what is special."""
    return " ".join(f"{f.name}={getattr(attrs, f.name)}" for f in fields(attrs)
                    if f.default is MISSING or getattr(attrs, f.name) != f.default)


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _fmt_param(p: ParamRecord) -> str:
    flag = "trainable" if p.trainable else "frozen"
    tied = f" tied_to={p.tied_to}" if p.tied_to else ""
    return f"    {p.path} {_fmt_shape(p.shape)} {p.dtype} {p.storage} {flag} role={p.role}{tied}"


def dump(ir: IR) -> str:
    """One line per node (`id = op(inputs) attrs -> shape`) and one indented line per
    param, in topological order: the text that golden before/after tests compare."""
    lines = []
    for n in ir.nodes():
        args = ", ".join(ir.inputs(n.id))
        lines.append(f"{n.id} = {n.op.value}({args}) {_fmt_attrs(n.attrs)} -> {_fmt_shape(n.shape)}")
        lines.extend(_fmt_param(p) for p in n.params)
    return "\n".join(lines) + "\n"



def attrs_type(op: Op) -> type:
    """The attrs record an op's nodes carry (an adapter op's comes from its kind)."""
    if op in ADAPTERS:
        from effc.compiler.adapters import KINDS  # the kinds import this module
        return KINDS[op.value].attrs
    return ATTRS[op]


def __getattr__(name: str):
    # LoRA's record moved to its kind module; it stays importable from here (PEP 562,
    # resolved on first use, since the kind module imports this one).
    if name == "LoraAttrs":
        from effc.compiler.adapters.lora import LoraAttrs
        return LoraAttrs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
