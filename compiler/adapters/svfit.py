"""SVFit (Sun et al. 2024, arXiv:2409.05926): fine-tuning the top singular values.

The target's weight W (out, in) = U diag(S) V^T splits into its best rank-r part
W_r = U_r diag(S_r) V_r^T and the rest W_e = W - W_r. The r largest singular values
train; U_r, V_r and W_e stay frozen: W' = W_e + U_r diag(s) V_r^T. effc keeps W as it
is and adds the change, with s0 = S_r the frozen starting values:

    y = x W^T + ((x V_r^T) ⊙ s - (x V_r^T) ⊙ s0) U_r^T + bias

which is W' exactly. The two products (rather than ⊙ (s - s0)) keep autograd from
saving the per-step difference s - s0, so all it saves is h = x V_r^T (r floats per
token) for s's gradient, and the optimizer holds 2r floats per weight. At init s = s0
bit for bit, so the update is exactly 0. Subtracting h ⊙ s0 rounds at the scale of
|h ⊙ s|, the scale x W^T itself is rounded at.

Params U (out, r), V (r, in) and s0 (r,) frozen (`trainable=False`: assign_roles keeps
an adapter param's own flag), s (r,) trainable. Init: the SVD of the target's weight in
float64 (`torch.linalg.svd`, reduced), each singular pair's sign fixed so that the
largest entry of u_i by magnitude is positive (the decomposition is then unique for
distinct singular values), rounded to the param's dtype; s and s0 are S_r. `init` is
called once per leaf: every leaf of a node reads one decomposition, cached by node id
and the weight's bytes. Merge: W + U diag(s - s0) V^T in float64, exact.

Cost: saves h (r per token) when s trains; forward temporaries: h ⊙ s, h ⊙ s0 and their
difference (3r per token); FLOPs 2 r (in + out) forward; backward 2 r out (the
gradient reaching h ⊙ s, which s's gradient needs) and 2 r in when the input needs a
gradient (U and V train nothing). Weights: U, V and s0 add (out + in + 1) · r frozen
floats per weight, held (as in the paper) so the trained s has its subspaces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from effc.compiler.adapters import AdapterKind, adapter_param, register
from effc.compiler.ir import Node, Op

LEAVES = ("U", "V", "s", "s0")  # param order; only s trains


@dataclass(frozen=True)
class SvfitAttrs:
    rank: int
    target: str


def singular_update(h, s, s0):
    """(x V^T) ⊙ s - (x V^T) ⊙ s0 from h = x V^T: (..., r) -> (..., r)."""
    return h * s - h * s0


_last: dict = {}  # (node id, sha256 of the weight) -> (U, S, Vh): the latest decomposition only


def top_singular(node_id: str, W):
    """U (out, k), S (k,), Vh (k, in) of W in float64, k = min(out, in), signs fixed."""
    W = W.detach().cpu()
    key = (node_id, hashlib.sha256(W.float().contiguous().numpy().data).hexdigest())
    if key not in _last:
        import torch  # checking and costing never get here
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        rows = U.abs().argmax(dim=0)  # the largest entry of each left singular vector
        sign = U[rows, torch.arange(U.shape[1])].sign()  # never 0: the columns are unit vectors
        _last.clear()
        _last[key] = (U * sign, S, Vh * sign[:, None])
    return _last[key]


class Svfit(AdapterKind):
    name = "svfit"
    attrs = SvfitAttrs

    def make(self, target, id, args, span, ir):
        t = target.attrs
        r = args["rank"]
        shapes = {"U": (t.out_features, r), "V": (r, t.in_features), "s": (r,), "s0": (r,)}
        params = tuple(replace(adapter_param(id, leaf, shapes[leaf]), trainable=leaf == "s") for leaf in LEAVES)
        return Node(id, Op.SVFIT, SvfitAttrs(r, target.id), params, span, target.shape)

    def check(self, node, target):
        r, t = node.attrs.rank, target.attrs
        return ("B", "T", t.out_features), [(t.out_features, r), (r, t.in_features), (r,), (r,)]

    def lower(self, b, node, x):
        U, V, s, s0 = (b.param(node, i) for i in range(4))
        h = b.linear(x, V)  # (B, T, r)
        return b.linear(b.call(singular_update, h, s, s0), U)  # (B, T, out)

    def init(self, node, leaf, t, g, args, base):
        U, S, Vh = top_singular(node.id, base["weight"])
        r = node.attrs.rank
        value = {"U": U[:, :r], "V": Vh[:r], "s": S[:r], "s0": S[:r]}[leaf]
        return t.copy_(value.to(t.dtype))

    def merge(self, node, params, weight, bias):
        U, V, s, s0 = (params[leaf].double() for leaf in LEAVES)
        return (weight.double() + (U * (s - s0)) @ V).to(weight.dtype), bias

    def saved(self, ir, node, rg):
        return set(), 4 * node.attrs.rank * node.params[2].trainable

    def forward_temporaries(self, ir, node):
        return 3 * node.attrs.rank

    def flops(self, ir, node, rg):
        r, t = node.attrs.rank, ir.node(node.attrs.target).attrs
        x = ir.inputs(node.id)[0]
        reaches_h = node.params[2].trainable or rg[x]  # a gradient flows back through U^T
        bwd = 2 * r * t.out_features * reaches_h + 2 * r * t.in_features * rg[x]
        return 2 * r * (t.in_features + t.out_features), bwd


register(Svfit())
