"""The canonical module tree that selectors walk, and the interface that supplies it.

The checker never imports the compiler: it asks a `ModelCatalog` for the tree of a model
declaration. The built-in `decoder(...)` tree is defined here because its paths are part
of the language (`layers[i].attn.q`); the compiler builds its modules to the same paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

# Module kinds a selector may filter on (`tiny.**:linear`).
KINDS = ("model", "embedding", "block", "attention", "mlp", "linear", "norm", "list")


@dataclass(frozen=True)
class Module:
    """A node of the module tree. `items` holds the elements of a list node (`layers`),
    `children` the named members of any other node. `shape` is (in, out) for linear
    layers and (rows, dim) for embeddings."""

    kind: str
    children: tuple[tuple[str, "Module"], ...] = ()
    items: tuple["Module", ...] = ()
    shape: tuple[int, int] | None = None

    @property
    def is_list(self) -> bool:
        return self.kind == "list"

    def child(self, name: str) -> "Module | None":
        return next((m for n, m in self.children if n == name), None)

    def child_names(self) -> list[str]:
        return [n for n, _ in self.children]


@dataclass(frozen=True)
class Selected:
    path: str  # canonical path below the model: "layers[0].attn.q" ("" for the model)
    module: Module


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def walk(sel: Selected) -> Iterator[Selected]:
    """The node and every node below it, in tree order."""
    stack = [sel]
    while stack:
        s = stack.pop()
        yield s
        m = s.module
        kids = [Selected(f"{s.path}[{i}]", it) for i, it in enumerate(m.items)]
        kids += [Selected(join(s.path, n), c) for n, c in m.children]
        stack.extend(reversed(kids))


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled for long contexts (Hugging Face's rope_type):
    "none"; "linear" (positions divided by `factor`); "llama3" (Llama 3.1: wavelengths
    longer than original_seq / low_freq are divided by `factor`, shorter than
    original_seq / high_freq kept, smoothly blended between)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq: float = 1.0
    high_freq: float = 4.0
    original_seq: int = 0


@dataclass(frozen=True)
class Arch:
    """Everything that decides a transformer's module tree and computation. `decoder(...)`
    and every supported Hugging Face family describe their model as one of these, so one
    lowering serves them all.

    norm "rms" (RMSNorm, no bias) or "layer" (LayerNorm with bias); pre-norm blocks
    (x + f(norm(x))) or post_norm (norm(x + f(x)), BERT); positions "rope" (rotary, in
    attention) or "learned" (a position table added to the token embedding); mlp
    "swiglu" (gate, up, down) or "gelu" / "gelu_tanh" (up, down); `causal` attention for
    decoders, bidirectional for encoders; `output` "lm" (a head over the vocabulary) or
    "embedding" (hidden states mean-pooled over the tokens, for sentence encoders)."""

    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    seq: int
    tied: bool = False
    norm: str = "rms"
    norm_eps: float = 1e-5
    post_norm: bool = False
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    mlp: str = "swiglu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    causal: bool = True
    type_vocab: int = 0  # token-type (segment) embeddings, BERT
    embed_norm: bool = False  # a norm right after the embeddings, BERT
    final_norm: bool = True
    output: str = "lm"
    position_rows: int = 0  # rows of a learned position table, when longer than seq (a checkpoint's)

    @property
    def positions_table(self) -> int:
        return self.position_rows or self.seq

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def decoder_arch(args: Mapping) -> Arch:
    """The built-in `decoder(...)`: Llama-style, pre-RMSNorm, rotary, SwiGLU, no biases."""
    heads = args["heads"]
    return Arch(vocab=args["vocab"], dim=args["dim"], layers=args["layers"], heads=heads,
                kv_heads=args.get("kv_heads") or heads, head_dim=args["dim"] // heads, ffn=args["ffn"],
                seq=args.get("seq", 0), tied=bool(args.get("tied", False)),
                norm_eps=float(args.get("norm_eps", 1e-5)), rope_theta=float(args.get("rope_theta", 10000.0)))


def arch_tree(a: Arch) -> Module:
    """The canonical module tree of an architecture. Always: embed, layers[i].{attn.{q,k,v,o},
    attn_norm, mlp, mlp_norm}; mlp is {gate, up, down} for SwiGLU and {up, down} otherwise;
    pos_embed with learned positions, type_embed and embed_norm for BERT-style encoders,
    norm (the final norm) and head where the model has them. Members are listed in the
    order they compute (a post-norm block normalises after attention and after the MLP).
    Linear shapes are (in_features, out_features)."""

    def lin(i: int, o: int) -> Module:
        return Module("linear", shape=(i, o))

    norm = Module("norm", shape=(a.dim, a.dim))
    attn = Module("attention", (("q", lin(a.dim, a.q_dim)), ("k", lin(a.dim, a.kv_dim)),
                                ("v", lin(a.dim, a.kv_dim)), ("o", lin(a.q_dim, a.dim))))
    mlp_members = (("gate", lin(a.dim, a.ffn)),) if a.mlp == "swiglu" else ()
    mlp = Module("mlp", mlp_members + (("up", lin(a.dim, a.ffn)), ("down", lin(a.ffn, a.dim))))
    if a.post_norm:
        block = Module("block", (("attn", attn), ("attn_norm", norm), ("mlp", mlp), ("mlp_norm", norm)))
    else:
        block = Module("block", (("attn_norm", norm), ("attn", attn), ("mlp_norm", norm), ("mlp", mlp)))
    top: list[tuple[str, Module]] = [("embed", Module("embedding", shape=(a.vocab, a.dim)))]
    if a.positions == "learned":
        top.append(("pos_embed", Module("embedding", shape=(a.positions_table, a.dim))))
    if a.type_vocab:
        top.append(("type_embed", Module("embedding", shape=(a.type_vocab, a.dim))))
    if a.embed_norm:
        top.append(("embed_norm", norm))
    top.append(("layers", Module("list", items=tuple(block for _ in range(a.layers)))))
    if a.final_norm:
        top.append(("norm", norm))
    if a.output == "lm":
        top.append(("head", lin(a.dim, a.vocab)))
    return Module("model", tuple(top))


def decoder_tree(args: Mapping) -> Module:
    """Llama-style decoder: embed, layers[i].{attn.{q,k,v,o}, mlp.{gate,up,down},
    attn_norm, mlp_norm}, norm, head."""
    return arch_tree(decoder_arch(args))


@dataclass(frozen=True)
class ModelCatalog:
    """How the checker learns a model's module tree. `archs` maps a family name to a
    function of its checked args that describes the architecture (the tree follows from
    it, and the compiler lowers the same record); `trees` gives a tree directly, for a
    family that has no `Arch` (tests use it). The compiler hands the checker its own
    catalog; `default_catalog()` knows the families the language itself defines."""

    trees: Mapping[str, Callable[[Mapping], Module]] = field(default_factory=dict)
    archs: Mapping[str, Callable[[Mapping], "Arch | None"]] = field(default_factory=dict)

    def arch(self, family: str, args: Mapping) -> Arch | None:
        make = self.archs.get(family)
        return make(args) if make else None

    def tree(self, family: str, args: Mapping) -> Module | None:
        if family in self.trees:
            return self.trees[family](args)
        arch = self.arch(family, args)
        return arch_tree(arch) if arch else None


def default_catalog() -> ModelCatalog:
    from effc.lang.hf import hf_arch  # the hf family reads config.json (no torch)

    return ModelCatalog(archs={"decoder": decoder_arch, "hf": hf_arch})
