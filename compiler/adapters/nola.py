"""NOLA (Koohpayegani et al. 2024, arXiv:2310.02556): LoRA whose two low-rank matrices are
linear combinations of fixed random bases, so that only the mixing coefficients train:

    A = Σ_i a_i A_i  (r, in),   B = Σ_j b_j B_j  (out, r),   y = x W^T + (alpha / r) · x A^T B^T

Params: the coefficients a (k,) and b (k,), k = `bases`, trainable; the bases, stacked
(k, r, in) and (k, out, r), frozen with storage "generated": never stored in a state, a
snapshot or an export, and made again from NOLA's own `seed` and the target's id whenever
a graph is built (`basis_seed`), so that two builds of the model, whatever the run's
seed, hold the same bases. Each basis element is uniform(-1, 1) / sqrt(k), as the
authors' GenerateParams draws them (github.com/UCDvision/NOLA).

Init: b = 0, so training starts from the base model. The authors' code starts both
coefficient vectors at zero and keeps a frozen kaiming-initialised A_0 beside the
mixture (A = A_0 + Σ a_i A_i); with A = Σ a_i A_i alone, a = b = 0 is a stationary
point (every gradient is zero), so here a is drawn uniform(±sqrt(3 / in)), which gives A
LoRA's kaiming-uniform variance: Var(A_rc) = k · (1 / in) · 1 / (3k) = 1 / (3 in), that of
uniform(±1 / sqrt(in)). Training then starts as LoRA's does: B = 0, A random.

Merge: W + (alpha / r) B A, exact, with the bases made again inside `merge`.

Cost: as a rank-r LoRA without dropout per token: it saves its input and A x (r floats)
for the gradients, and costs LoRA's matmul FLOPs (2 (r·in + out·r) forward; backward the
input gradient when x needs one and the gradient of the mixed A and B). Mixing the bases
(2 k (r·in + out·r) FLOPs forward and again backward, for the coefficients' gradients)
happens once per step, not per token, and so is not in the per-token FLOPs; neither are
the mixed A and B that backward keeps (out·r floats, and r·in when x needs a gradient):
per-step bytes, which the per-token activation model leaves out. The generated bases are
held in memory: their bytes are in the weights, and not in the parameter counts.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass

from effc.compiler.adapters import adapter_param, register
from effc.compiler.adapters.lora import AssembledLowRank
from effc.compiler.ir import Node, Op, ParamRecord

BASES = ("A_bases", "B_bases")  # the generated leaves, in param order after a and b


@dataclass(frozen=True)
class NolaAttrs:
    rank: int
    bases: int
    alpha: float
    seed: int  # NOLA's own: it alone (with the target) makes the bases
    target: str


def basis_seed(seed: int, target: str, leaf: str) -> int:
    """A 63-bit seed for one target's bases, from NOLA's seed and the target id only: a
    different run seed, a second build or a reload make the same bases."""
    digest = hashlib.sha256(f"nola:{seed}:{target}:{leaf}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fill_bases(node: Node, leaf: str, t):
    """The bases of `leaf` into t, shape (k, ...): uniform(-1, 1) / sqrt(k)."""
    import torch  # checking and costing never load torch (see the package docstring)

    g = torch.Generator().manual_seed(basis_seed(node.attrs.seed, node.attrs.target, leaf))
    return t.uniform_(-1.0, 1.0, generator=g).div_(math.sqrt(node.attrs.bases))


def generated(node: Node, leaf: str, shape: tuple[int, ...]):
    """The bases of `leaf` made again, float64 on the CPU (for the merge)."""
    import torch

    return fill_bases(node, leaf, torch.empty(shape)).double()


def mix(c, bases):
    """Σ_i c_i · bases_i: (k,) and (k, ...) -> (...), one vector-matrix product over the
    flattened bases (a view: the bases are never copied)."""
    return (c @ bases.flatten(1)).view(bases.shape[1:])


class Nola(AssembledLowRank):
    name = "nola"
    attrs = NolaAttrs

    def make(self, target, id, args, span, ir):
        t = target.attrs
        rank, k = args["rank"], args.get("bases", 64)
        attrs = NolaAttrs(rank, k, float(args.get("alpha") or rank), int(args.get("seed", 0)), target.id)
        shapes = [(k, rank, t.in_features), (k, t.out_features, rank)]
        bases = tuple(ParamRecord(f"{id}.{leaf}", shape, "adapter", trainable=False, storage="generated")
                      for leaf, shape in zip(BASES, shapes))
        return Node(id, Op.NOLA, attrs, (adapter_param(id, "a", (k,)), adapter_param(id, "b", (k,))) + bases,
                    span, target.shape)

    def check(self, node, target):
        a, t = node.attrs, target.attrs
        k = a.bases
        return ("B", "T", t.out_features), [(k,), (k,), (k, a.rank, t.in_features), (k, t.out_features, a.rank)]

    def lower(self, b, node, x):
        A = b.call(mix, b.param(node, 0), b.param(node, 2))  # (rank, in)
        B = b.call(mix, b.param(node, 1), b.param(node, 3))  # (out, rank)
        h = b.linear(x, A)  # (B, T, rank)
        h = b.linear(h, B)  # (B, T, out)
        return b.call(operator.mul, h, node.attrs.alpha / node.attrs.rank)

    def init(self, node, leaf, t, g, args, base):
        if leaf in BASES:
            return fill_bases(node, leaf, t)
        if leaf == "b":
            return t.zero_()
        bound = math.sqrt(3.0 / base["weight"].shape[1])  # Var(A) = 1 / (3 in): see the docstring
        return t.uniform_(-bound, bound, generator=g)

    def merge(self, node, params, weight, bias):
        a = node.attrs
        out, in_ = weight.shape
        A = mix(params["a"].double(), generated(node, "A_bases", (a.bases, a.rank, in_)).to(weight.device))
        B = mix(params["b"].double(), generated(node, "B_bases", (a.bases, out, a.rank)).to(weight.device))
        return weight + (a.alpha / a.rank) * (B @ A).to(weight.dtype), bias


register(Nola())
