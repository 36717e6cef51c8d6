"""Lowering: a checked model declaration -> IR.

Every model family describes its architecture as an `effc.lang.tree.Arch` (the built-in
`decoder`, and the Llama, GPT-2 and BERT families of `hf(...)`), and one lowering turns
an Arch into the IR: token embedding (plus learned positions and token types where the
family has them), pre- or post-norm blocks of attention (rotary or not, causal or not,
grouped-query) and an MLP (SwiGLU or GELU), then a head over the vocabulary and the loss,
or, for an encoder, mean pooling. Parametric node ids are the canonical paths of
`effc.lang.tree.arch_tree`, so a selector the checker accepted names exactly the IR nodes
a pass rewrites. Nothing here allocates a weight: a param is a record of its shape.
"""

from __future__ import annotations

from effc.compiler.ir import (
    BATCH, IR, SEQ, AttentionAttrs, EmbeddingAttrs, GeluAttrs, IRError, LinearAttrs, LossAttrs, Node,
    NormAttrs, Op, ParamRecord, PoolAttrs, PositionAttrs, ResidualAttrs, RotaryAttrs, SwigluAttrs,
)
from effc.lang.check import ModelInfo
from effc.lang.diagnostics import Span
from effc.lang.tree import Arch


class _Builder:
    """Collects nodes and edges in program order; each helper returns the new node's id."""

    def __init__(self, span: Span, arch: Arch):
        self.span = span
        self.a = arch
        self.nodes: list[Node] = []
        self.edges: list[tuple[str, str, int]] = []

    def add(self, id: str, op: Op, attrs, inputs: list[str], shape: tuple,
            params: tuple[ParamRecord, ...] = ()) -> str:
        self.nodes.append(Node(id, op, attrs, params, self.span, shape))
        self.edges.extend((src, id, port) for port, src in enumerate(inputs))
        return id

    def act(self, id: str, op: Op, attrs, inputs: list[str], width: int,
            params: tuple[ParamRecord, ...] = ()) -> str:
        return self.add(id, op, attrs, inputs, (BATCH, SEQ, width), params)

    def linear(self, path: str, x: str, i: int, o: int, role: str, bias: bool) -> str:
        params = (ParamRecord(f"{path}.weight", (o, i), role),)  # (out, in), as torch stores it
        if bias:
            params += (ParamRecord(f"{path}.bias", (o,), role),)
        return self.act(path, Op.LINEAR, LinearAttrs(i, o, bias), [x], o, params)

    def norm(self, path: str, x: str) -> str:
        a = self.a
        params = (ParamRecord(f"{path}.weight", (a.dim,), "norm"),)
        if a.norm == "layer":
            params += (ParamRecord(f"{path}.bias", (a.dim,), "norm"),)
        op = Op.LAYERNORM if a.norm == "layer" else Op.RMSNORM
        return self.act(path, op, NormAttrs(a.dim, a.norm_eps), [x], a.dim, params)


def lower_model(info: ModelInfo) -> IR:
    if info.arch is None:
        raise IRError(f"cannot lower model '{info.name}': family {info.family!r} has no architecture")
    return lower_arch(info.arch, info.span)


def lower_arch(a: Arch, span: Span) -> IR:
    b = _Builder(span, a)
    x = b.act("embed", Op.EMBEDDING, EmbeddingAttrs(a.vocab, a.dim), [], a.dim,
              (ParamRecord("embed.weight", (a.vocab, a.dim), "embedding"),))
    if a.positions == "learned":
        rows = a.positions_table
        x = b.act("pos_embed", Op.POSITION, PositionAttrs(rows, a.dim, "position"), [x], a.dim,
                  (ParamRecord("pos_embed.weight", (rows, a.dim), "embedding"),))
    if a.type_vocab:
        x = b.act("type_embed", Op.POSITION, PositionAttrs(a.type_vocab, a.dim, "type"), [x], a.dim,
                  (ParamRecord("type_embed.weight", (a.type_vocab, a.dim), "embedding"),))
    if a.embed_norm:
        x = b.norm("embed_norm", x)
    for i in range(a.layers):
        x = _block(b, f"layers[{i}]", x)
    if a.final_norm:
        x = b.norm("norm", x)
    if a.output == "embedding":
        b.add("pool", Op.POOL, PoolAttrs(a.dim), [x], (BATCH, a.dim))
        return IR.build(b.nodes, b.edges)
    # A tied head reads the embedding's (vocab, dim) matrix, which is also (out, in).
    tied = "embed.weight" if a.tied else None
    w = ParamRecord("head.weight", (a.vocab, a.dim), "head", tied_to=tied)
    logits = b.act("head", Op.LINEAR, LinearAttrs(a.dim, a.vocab), [x], a.vocab, (w,))
    b.add("loss", Op.LOSS, LossAttrs(a.vocab), [logits], ())  # the loss is a scalar
    return IR.build(b.nodes, b.edges)


def _attention(b: _Builder, p: str, h: str) -> str:
    a = b.a
    q = b.linear(f"{p}.attn.q", h, a.dim, a.q_dim, "attention", a.qkv_bias)
    k = b.linear(f"{p}.attn.k", h, a.dim, a.kv_dim, "attention", a.qkv_bias)
    v = b.linear(f"{p}.attn.v", h, a.dim, a.kv_dim, "attention", a.qkv_bias)
    if a.positions == "rope":
        s = a.rope_scaling
        scaling = (s.kind, s.factor, s.low_freq, s.high_freq, s.original_seq)
        q = b.act(f"{p}.attn.rope_q", Op.ROTARY, RotaryAttrs(a.heads, a.head_dim, a.rope_theta, *scaling), [q], a.q_dim)
        k = b.act(f"{p}.attn.rope_k", Op.ROTARY, RotaryAttrs(a.kv_heads, a.head_dim, a.rope_theta, *scaling), [k],
                  a.kv_dim)
    o = b.act(f"{p}.attn.core", Op.ATTENTION_CORE, AttentionAttrs(a.heads, a.kv_heads, a.head_dim, a.causal),
              [q, k, v], a.q_dim)
    return b.linear(f"{p}.attn.o", o, a.q_dim, a.dim, "attention", a.o_bias)


def _mlp(b: _Builder, p: str, h: str) -> str:
    a = b.a
    if a.mlp == "swiglu":
        g = b.linear(f"{p}.mlp.gate", h, a.dim, a.ffn, "mlp", a.mlp_bias)
        u = b.linear(f"{p}.mlp.up", h, a.dim, a.ffn, "mlp", a.mlp_bias)
        s = b.act(f"{p}.mlp.swiglu", Op.SWIGLU, SwigluAttrs(a.ffn), [g, u], a.ffn)
    else:
        u = b.linear(f"{p}.mlp.up", h, a.dim, a.ffn, "mlp", a.mlp_bias)
        approx = "tanh" if a.mlp == "gelu_tanh" else "none"
        s = b.act(f"{p}.mlp.act", Op.GELU, GeluAttrs(a.ffn, approx), [u], a.ffn)
    return b.linear(f"{p}.mlp.down", s, a.ffn, a.dim, "mlp", a.mlp_bias)


def _block(b: _Builder, p: str, x: str) -> str:
    """One transformer block; returns the id of its output. Pre-norm: x + f(norm(x));
    post-norm (BERT): norm(x + f(x))."""
    res = ResidualAttrs(b.a.dim)
    if b.a.post_norm:
        x = b.act(f"{p}.attn_residual", Op.RESIDUAL_ADD, res, [x, _attention(b, p, x)], b.a.dim)
        x = b.norm(f"{p}.attn_norm", x)
        x = b.act(f"{p}.mlp_residual", Op.RESIDUAL_ADD, res, [x, _mlp(b, p, x)], b.a.dim)
        return b.norm(f"{p}.mlp_norm", x)
    x = b.act(f"{p}.attn_residual", Op.RESIDUAL_ADD, res, [x, _attention(b, p, b.norm(f"{p}.attn_norm", x))], b.a.dim)
    return b.act(f"{p}.mlp_residual", Op.RESIDUAL_ADD, res, [x, _mlp(b, p, b.norm(f"{p}.mlp_norm", x))], b.a.dim)
