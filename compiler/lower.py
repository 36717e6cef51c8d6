"""Lowering: a checked model declaration -> IR.

Only the built-in `decoder` family lands here (Llama-style: RMSNorm, rotary positions,
SwiGLU MLP, grouped-query attention, tied or untied head). Parametric node ids are the
canonical paths of `effc.lang.tree.decoder_tree`, so a selector the checker accepted
names exactly the IR nodes a pass rewrites. Nothing here allocates a weight: a param is a
record of its shape.
"""

from __future__ import annotations

from effc.compiler.ir import (
    BATCH, IR, SEQ, AttentionAttrs, EmbeddingAttrs, IRError, LinearAttrs, LossAttrs, Node, NormAttrs,
    Op, ParamRecord, ResidualAttrs, RotaryAttrs, SwigluAttrs,
)
from effc.lang.check import ModelInfo
from effc.lang.diagnostics import Span


class _Builder:
    """Collects nodes and edges in program order; each helper returns the new node's id."""

    def __init__(self, span: Span):
        self.span = span
        self.nodes: list[Node] = []
        self.edges: list[tuple[str, str, int]] = []

    def add(self, id: str, op: Op, attrs, inputs: list[str], width: int | None,
            params: tuple[ParamRecord, ...] = ()) -> str:
        shape = (BATCH, SEQ, width) if width is not None else ()  # the loss is a scalar
        self.nodes.append(Node(id, op, attrs, params, self.span, shape))
        self.edges.extend((src, id, port) for port, src in enumerate(inputs))
        return id

    def linear(self, path: str, x: str, i: int, o: int, role: str) -> str:
        w = ParamRecord(f"{path}.weight", (o, i), role)  # (out, in), as torch stores it
        return self.add(path, Op.LINEAR, LinearAttrs(i, o), [x], o, (w,))

    def norm(self, path: str, x: str, dim: int, eps: float) -> str:
        w = ParamRecord(f"{path}.weight", (dim,), "norm")
        return self.add(path, Op.RMSNORM, NormAttrs(dim, eps), [x], dim, (w,))


def lower_model(info: ModelInfo) -> IR:
    if info.family != "decoder":
        raise IRError(f"cannot lower model family {info.family!r}: only 'decoder' has landed")
    return _lower_decoder(info.args, info.span)


def _lower_decoder(a: dict, span: Span) -> IR:
    dim, vocab, ffn, eps = a["dim"], a["vocab"], a["ffn"], a["norm_eps"]
    heads = a["heads"]
    kv_heads = a.get("kv_heads") or heads  # None means plain multi-head attention
    hd = dim // heads
    b = _Builder(span)
    x = b.add("embed", Op.EMBEDDING, EmbeddingAttrs(vocab, dim), [], dim,
              (ParamRecord("embed.weight", (vocab, dim), "embedding"),))
    for i in range(a["layers"]):
        x = _block(b, f"layers[{i}]", x, dim, ffn, heads, kv_heads, hd, eps, a["rope_theta"])
    x = b.norm("norm", x, dim, eps)
    # A tied head reads the embedding's (vocab, dim) matrix, which is also (out, in).
    tied = "embed.weight" if a["tied"] else None
    w = ParamRecord("head.weight", (vocab, dim), "head", tied_to=tied)
    logits = b.add("head", Op.LINEAR, LinearAttrs(dim, vocab), [x], vocab, (w,))
    b.add("loss", Op.LOSS, LossAttrs(vocab), [logits], None)
    return IR.build(b.nodes, b.edges)


def _block(b: _Builder, p: str, x: str, dim: int, ffn: int, heads: int, kv_heads: int,
           hd: int, eps: float, theta: float) -> str:
    """One pre-norm transformer block; returns the id of its output (the second residual)."""
    kv = kv_heads * hd
    h = b.norm(f"{p}.attn_norm", x, dim, eps)
    q = b.linear(f"{p}.attn.q", h, dim, dim, "attention")
    k = b.linear(f"{p}.attn.k", h, dim, kv, "attention")
    v = b.linear(f"{p}.attn.v", h, dim, kv, "attention")
    q = b.add(f"{p}.attn.rope_q", Op.ROTARY, RotaryAttrs(heads, hd, theta), [q], dim)
    k = b.add(f"{p}.attn.rope_k", Op.ROTARY, RotaryAttrs(kv_heads, hd, theta), [k], kv)
    o = b.add(f"{p}.attn.core", Op.ATTENTION_CORE, AttentionAttrs(heads, kv_heads, hd), [q, k, v], dim)
    o = b.linear(f"{p}.attn.o", o, dim, dim, "attention")
    x = b.add(f"{p}.attn_residual", Op.RESIDUAL_ADD, ResidualAttrs(dim), [x, o], dim)
    h = b.norm(f"{p}.mlp_norm", x, dim, eps)
    g = b.linear(f"{p}.mlp.gate", h, dim, ffn, "mlp")
    u = b.linear(f"{p}.mlp.up", h, dim, ffn, "mlp")
    s = b.add(f"{p}.mlp.swiglu", Op.SWIGLU, SwigluAttrs(ffn), [g, u], ffn)
    d = b.linear(f"{p}.mlp.down", s, ffn, dim, "mlp")
    return b.add(f"{p}.mlp_residual", Op.RESIDUAL_ADD, ResidualAttrs(dim), [x, d], dim)
