"""LoRA (Hu et al. 2021, arXiv:2106.09685): y = x W^T + s · dropout(x) A^T B^T, s = alpha / r,
or s = alpha / sqrt(r) with rslora=true (rank-stabilized LoRA, Kalajdzievski 2023,
arXiv:2312.03732: the update's scale no longer shrinks as the rank grows).

Params A (r, in) and B (out, r). Init: B = 0, so training starts from the base model;
A with init=kaiming uniform(±1/sqrt(in)) (torch's default for a linear layer of that
width), with init=gaussian N(0, 1/r). init=pissa (Meng et al. 2024, PiSSA,
arXiv:2404.02948): with W = U diag(S) V^T, A = diag(sqrt(S_r / s)) V_r^T and
B = U_r diag(sqrt(S_r / s)), so that s B A is W's top-r singular part, and the frozen
weight becomes the residual W - s B A: the model starts where it was, and training
moves the principal directions (PEFT's init_lora_weights="pissa", computed here in
float64). sparse_delta=true, on a pruned weight, trains the update s (B A ⊙ M), M the
weight's nonzeros, so the merged weight keeps its sparsity exactly: the graph forms the
(out, in) update each step and multiplies by it (its cost is shown as such). Merge:
W + s B A. Cost: saves its input (with dropout, the dropped copy and a
1-byte mask when the input needs a gradient) and the rank-r intermediate A x, both
needed for the A and B gradients.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from effc.compiler.adapters import AdapterKind, adapter_param, register
from effc.compiler.ir import IR, Node, Op

MASK_BYTES = 1


@dataclass(frozen=True)
class LoraAttrs:
    rank: int
    alpha: float
    dropout: float
    target: str  # id of the LINEAR node the update is added to
    rslora: bool = False
    sparse_delta: bool = False  # the update is masked by the (pruned) target weight's zeros

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_update(x, A, B, scale: float):
    """The reference: scale · x A^T B^T, (..., in) -> (..., out)."""
    return (x @ A.T) @ B.T * scale


def masked_delta(B, A, W, scale: float):
    """sparse_delta: the update matrix scale · B A with the pruned weight's zeros kept,
    (out, in); the reference is (scale * B @ A) * (W != 0)."""
    return (B @ A).mul_(W != 0).mul_(scale)


def low_rank(b, node: Node, x, scale: float, A: int = 0, B: int = 1):
    """scale · B A dropout(x) in the fx graph: two linears and a product, so the (r, in)
    and (out, r) matrices are never multiplied out."""
    a = node.attrs
    h = b.dropout(node, a.dropout, x) if a.dropout else x
    h = b.linear(h, b.param(node, A))  # (B, T, rank)
    h = b.linear(h, b.param(node, B))  # (B, T, out)
    return b.call(operator.mul, h, scale)


def pissa(W, rank: int, scale: float):
    """(A, B) of PiSSA for weight W (out, in), in float64: s B A = W's top-r singular part."""
    U, S, Vh = _svd(W.double())
    root = (S[:rank] / scale).sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def _svd(W):
    import torch  # kind modules keep torch out of import time (checking never loads it)
    return torch.linalg.svd(W, full_matrices=False)


def low_rank_init(node: Node, leaf: str, t, g, args: dict, base: dict | None = None):
    if args.get("residual") is not None:
        # per_loop (Bae et al. 2024): s B A starts as the top-r singular part of the original
        # layer's weight minus its shared block's, handed over by the share (effc.runtime.compress)
        A, B = pissa(args["residual"], node.attrs.rank, node.attrs.scale)
        return t.copy_(A if leaf == "A" else B)
    if args.get("init") == "pissa":  # B is made last: then the base keeps the residual
        A, B = pissa(base["weight"], node.attrs.rank, node.attrs.scale)
        if leaf == "B":
            base["weight"].sub_((node.attrs.scale * (B @ A)).to(base["weight"].dtype))
        return t.copy_(A if leaf == "A" else B)
    if leaf == "B":
        return t.zero_()
    if args.get("init") == "gaussian":
        return t.normal_(0.0, 1.0 / node.attrs.rank, generator=g)
    bound = 1.0 / math.sqrt(t.shape[1])  # A is (rank, in)
    return t.uniform_(-bound, bound, generator=g)


def low_rank_saved(ir: IR, node: Node, rg: dict[str, bool]) -> tuple[set[str], int]:
    a = node.attrs
    x = ir.node(ir.inputs(node.id)[0])
    shared, extra = set(), a.rank * 4
    if a.dropout:  # the mask is kept only when the input needs a gradient
        extra += x.shape[-1] * (4 + MASK_BYTES * rg[x.id])
    else:
        shared.add(x.id)
    return shared, extra


def low_rank_flops(ir: IR, node: Node, rg: dict[str, bool]) -> tuple[int, int]:
    """Per-token FLOPs of s·B·A·x with A (r, in) and B (out, r) trained (or made from
    trained params): 2 per element of each forward; backward, B's gradient (2 r out),
    the gradient at A x (2 r out, which A's gradient needs even when x needs none), A's
    gradient (2 r in), and x's (2 r in) when x needs one."""
    t = ir.node(node.attrs.target).attrs
    r, i, o = node.attrs.rank, t.in_features, t.out_features
    return 2 * r * (i + o), 4 * r * o + 2 * r * i + 2 * r * i * rg[ir.inputs(node.id)[0]]


class Lora(AdapterKind):
    name = "lora"
    attrs = LoraAttrs

    def make(self, target, id, args, span, ir):
        t = target.attrs
        rank = args["rank"]
        alpha = args.get("alpha") or rank  # the checker fills alpha=rank; hand-built uses may not
        attrs = LoraAttrs(rank, float(alpha), float(args.get("dropout", 0.0)), target.id, bool(args.get("rslora")),
                          bool(args.get("sparse_delta")))
        params = (adapter_param(id, "A", (rank, t.in_features)), adapter_param(id, "B", (t.out_features, rank)))
        return Node(id, Op.LORA, attrs, params, span, target.shape)

    def check(self, node, target):
        a, t = node.attrs, target.attrs
        return ("B", "T", t.out_features), [(a.rank, t.in_features), (t.out_features, a.rank)]

    def lower(self, b, node, x):
        a = node.attrs
        if not a.sparse_delta:
            return low_rank(b, node, x, a.scale)
        h = b.dropout(node, a.dropout, x) if a.dropout else x
        w = b.param(b.ir.node(a.target), 0)
        return b.linear(h, b.call(masked_delta, b.param(node, 1), b.param(node, 0), w, a.scale))

    def init(self, node, leaf, t, g, args, base):
        return low_rank_init(node, leaf, t, g, args, base)

    def merge(self, node, params, weight, bias):
        a = node.attrs
        delta = params["B"].double() @ params["A"].double()
        if a.sparse_delta:  # what the graph trained: the update on the kept weights only
            delta = delta * (weight != 0)
        return weight + (a.scale * delta).to(weight.dtype), bias

    def saved(self, ir, node, rg):
        if node.attrs.sparse_delta:  # x for the update's gradient (and dropout's copy and mask)
            x = ir.node(ir.inputs(node.id)[0])
            if node.attrs.dropout:
                return set(), x.shape[-1] * (4 + MASK_BYTES * rg[x.id])
            return {x.id}, 0
        return low_rank_saved(ir, node, rg)

    def saved_per_step(self, ir, node, rg):
        """sparse_delta: the masked (out, in) update and the weight's 1-byte mask, kept for
        backward once a step."""
        if not node.attrs.sparse_delta:
            return 0
        t = ir.node(node.attrs.target).attrs
        return t.in_features * t.out_features * (4 + MASK_BYTES)

    def forward_temporaries(self, ir, node):
        return node.shape[-1]  # B(Ax) before scaling, or the masked update's output

    def flops(self, ir, node, rg):
        if not node.attrs.sparse_delta:
            return low_rank_flops(ir, node, rg)
        # per token a dense (out, in) matmul, and backward the update's gradient and x's;
        # forming B A (2 r out in) happens once a micro-batch, not per token
        t = ir.node(node.attrs.target).attrs
        w = t.in_features * t.out_features
        return 2 * w, 2 * w + 2 * w * rg[ir.inputs(node.id)[0]]


register(Lora())


class AssembledLowRank(AdapterKind):
    """The cost of a rank-r update s·B·A·x whose A (r, in) and B (out, r) are assembled
    each step from other params (NOLA's mixed bases, MoS's shard pools): per token as
    LoRA without dropout (x, and A x for B's gradient; LoRA's FLOPs), plus the assembled
    B, and A when x needs a gradient, kept once a step for backward."""

    def saved(self, ir, node, rg):
        return {ir.inputs(node.id)[0]}, 4 * node.attrs.rank  # x, and A x for B's gradient

    def saved_per_step(self, ir, node, rg):
        t = ir.node(node.attrs.target).attrs  # the assembled B, and A when x needs a gradient
        return 4 * node.attrs.rank * (t.out_features + t.in_features * rg[ir.inputs(node.id)[0]])

    def forward_temporaries(self, ir, node):
        return node.shape[-1]  # B(Ax) before scaling

    def flops(self, ir, node, rg):
        return low_rank_flops(ir, node, rg)

