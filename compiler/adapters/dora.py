"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + s B A) / ||W + s B A||_c,   s = alpha / r (alpha / sqrt(r) with rslora=true)

where ||.||_c is the L2 norm of each output row over the input dimension (PEFT's
`lora_magnitude_vector` has shape (out,)), and the norm is detached: it follows the
update but passes no gradient (the paper's section 4.3; PEFT's peft/tuners/lora/dora.py).
The layer computes y = (m / n) ⊙ (x W^T + s B A dropout(x)) + bias, with n that norm.

Params A (r, in), B (out, r) and m (out,). Init: A and B as LoRA's (B = 0), and m = ||W||_c,
so training starts from the base model. Merge: W' above, exact; the bias is unchanged.
Dropout applies to the low-rank path only; PEFT, when training with dropout, also
rescales a dropped copy of the base output, so the two agree in eval mode and with
dropout=0. DoRA rescales the weight, so it is the only adapter on its weight.

Cost: LoRA's saved tensors plus the sum x W^T + s B A x (out per token), which the
gradient of m needs, and once a step the row norms n and m / n (2 out floats). Each
forward also forms W + s B A and its row norms: O(out · in · r) per step, not per
token, so not in the per-token FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from effc.compiler.adapters import AdapterKind, adapter_param, register
from effc.compiler.adapters.lora import LoraAttrs, low_rank, low_rank_flops, low_rank_init, low_rank_saved
from effc.compiler.ir import Node, Op


@dataclass(frozen=True)
class DoraAttrs:
    rank: int
    alpha: float
    dropout: float
    target: str
    rslora: bool = False

    scale = LoraAttrs.scale


def dora_norm(W, A, B, scale: float):
    """||W + s B A||_c: the L2 norm of each output row, with no gradient (detached)."""
    return (W + scale * (B.detach() @ A.detach())).norm(dim=1).detach()


def dora_output(y, u, W, bias, A, B, m, scale: float):
    """The adapted layer's output from the base output y = x W^T + bias and the low-rank
    update u = s B A x: (m / n) ⊙ (x W^T + u) + bias."""
    k = m / dora_norm(W, A, B, scale)
    return k * (y - bias + u) + bias if bias is not None else k * (y + u)


class Dora(AdapterKind):
    name = "dora"
    attrs = DoraAttrs
    additive = False

    def make(self, target, id, args, span, ir):
        t = target.attrs
        rank = args["rank"]
        attrs = DoraAttrs(rank, float(args.get("alpha") or rank), float(args.get("dropout", 0.0)), target.id,
                          bool(args.get("rslora")))
        params = (adapter_param(id, "A", (rank, t.in_features)), adapter_param(id, "B", (t.out_features, rank)),
                  adapter_param(id, "m", (t.out_features,)))
        return Node(id, Op.DORA, attrs, params, span, target.shape)

    def check(self, node, target):
        a, t = node.attrs, target.attrs
        return ("B", "T", t.out_features), [(a.rank, t.in_features), (t.out_features, a.rank), (t.out_features,)]

    def lower(self, b, node, x):
        return low_rank(b, node, x, node.attrs.scale)

    def after(self, b, node, value, y):
        target = b.ir.node(node.attrs.target)
        bias = b.param(target, 1) if target.attrs.bias else None
        return b.call(dora_output, y, value, b.param(target, 0), bias, b.param(node, 0), b.param(node, 1),
                      b.param(node, 2), node.attrs.scale)

    def init(self, node, leaf, t, g, args, base):
        if leaf == "m":  # B = 0 at the start, so ||W + s B A||_c = ||W||_c
            return t.copy_(base["weight"].norm(dim=1))
        return low_rank_init(node, leaf, t, g, args)

    def merge(self, node, params, weight, bias):
        a = node.attrs
        V = weight.double() + a.scale * (params["B"].double() @ params["A"].double())
        W = params["m"].double()[:, None] * V / V.norm(dim=1, keepdim=True)
        return W.to(weight.dtype), bias

    def saved(self, ir, node, rg):
        shared, extra = low_rank_saved(ir, node, rg)
        return shared, extra + 4 * node.shape[-1]  # x W^T + u, for m's gradient

    def flops(self, ir, node, rg):
        return low_rank_flops(ir, node, rg)

    def saved_per_step(self, ir, node, rg):
        return 4 * 2 * node.shape[-1]  # the norm n, for m / n's gradient, and m / n, for the rescale's

    def forward_temporaries(self, ir, node):
        return 2 * node.shape[-1]  # B(Ax) before scaling; x W^T + u before the rescale


register(Dora())
