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


def decoder_tree(args: Mapping) -> Module:
    """Llama-style decoder: embed, layers[i].{attn.{q,k,v,o}, mlp.{gate,up,down},
    attn_norm, mlp_norm}, norm, head. Linear shapes are (in_features, out_features)."""
    dim, ffn, vocab = args["dim"], args["ffn"], args["vocab"]
    heads = args["heads"]
    kv_heads = args.get("kv_heads") or heads
    kv_dim = dim // heads * kv_heads

    def lin(i: int, o: int) -> Module:
        return Module("linear", shape=(i, o))

    attn = Module("attention", (("q", lin(dim, dim)), ("k", lin(dim, kv_dim)),
                                ("v", lin(dim, kv_dim)), ("o", lin(dim, dim))))
    mlp = Module("mlp", (("gate", lin(dim, ffn)), ("up", lin(dim, ffn)), ("down", lin(ffn, dim))))
    norm = Module("norm", shape=(dim, dim))
    block = Module("block", (("attn_norm", norm), ("attn", attn), ("mlp_norm", norm), ("mlp", mlp)))
    return Module("model", (
        ("embed", Module("embedding", shape=(vocab, dim))),
        ("layers", Module("list", items=tuple(block for _ in range(args["layers"])))),
        ("norm", norm),
        ("head", lin(dim, vocab)),
    ))


@dataclass(frozen=True)
class ModelCatalog:
    """How the checker learns a model's module tree: family name -> (checked args -> tree).
    The compiler hands the checker its own catalog; `default_catalog()` knows the
    families whose trees the language itself defines."""

    trees: Mapping[str, Callable[[Mapping], Module]] = field(default_factory=dict)

    def tree(self, family: str, args: Mapping) -> Module | None:
        make = self.trees.get(family)
        return make(args) if make else None


def default_catalog() -> ModelCatalog:
    return ModelCatalog({"decoder": decoder_tree})
