"""MoS (Wang et al. 2024, "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation
with Mixture of Shards", arXiv:2410.00938): LoRA whose low-rank vectors are assembled from
shards of pools that many weights share.

    A (r, in):  row k = P_A[iA_k1] ++ ... ++ P_A[iA_kL]     (L = shards, ++ concatenates)
    B (out, r): column k = P_B[iB_k1] ++ ... ++ P_B[iB_kL]
    y = x W^T + (alpha / r) · x A^T B^T

The paper's differentiation strategies, as effc implements them:
- global sharing: every target of one adapt statement with the same (in, out) reads two
  pools of trainable shards, P_A (pool, in/L) and P_B (pool, out/L). The pools belong to
  the group's first target (by id); the other targets' pool params are `tied_to` them,
  so a pool is one tensor, counted, stored and optimised once, and its gradient is the
  sum over the targets that use it;
- subset selection: each target draws its r·L shards of each pool, all distinct, by a
  fixed seeded choice (`shard_index`: pure Python from the seed and the target id, so
  it is stable across runs and versions and recomputed from the attrs; the paper's
  MoE-like routing reads such an index matrix, and nothing here trains the choice),
  which needs pool >= r·L (the checker says so);
- pair dissociation: A and B draw with independent choices, so a shard of P_A is not
  paired with the same shard of P_B in every weight that uses it;
- vector sharding: each low-rank vector is L shards (shards=L), not one pool row.
Shard privatization (a part of each vector private to its weight) is not implemented:
every shard comes from the shared pools.

Init: P_A as LoRA's A, kaiming-uniform ±1/sqrt(in) (the target's full input width), and
P_B = 0, so B = 0 and training starts from the base model. Merge: W + (alpha / r) B A,
exact, each target with its own draw of the shared pools.

Cost: per token as a rank-r LoRA without dropout: it saves its input and A x (r floats),
and costs LoRA's matmul FLOPs. Assembling A and B is a gather (no FLOPs) once per step;
the assembled B (out·r floats), and A (r·in) when x needs a gradient, are kept for
backward: per-step bytes, which the per-token activation model leaves out. Parameters:
2 pools per shape group, pool · (in + out) / L each group, whatever the number of layers.

Legend: P pool rows, S shard width (in / L or out / L), R rank, L shards per vector.
"""

from __future__ import annotations

import hashlib
import math
import operator
import random
from dataclasses import dataclass

from effc.compiler.adapters import adapter_id, register
from effc.compiler.adapters.lora import AssembledLowRank
from effc.compiler.ir import Node, Op, ParamRecord

POOLS = ("PA", "PB")


@dataclass(frozen=True)
class MosAttrs:
    rank: int
    pool: int
    shards: int
    alpha: float
    seed: int
    target: str


def shard_index(a: MosAttrs, which: str) -> list[list[int]]:
    """The pool rows each of the r vectors of A (which="A") or B ("B") concatenates: r
    lists of `shards` distinct indices, the first r·L of a permutation of range(pool)
    seeded from (seed, target, which). Fisher-Yates on `Random.random()`, whose sequence
    for a given seed Python guarantees across versions (its `sample` is not)."""
    digest = hashlib.sha256(f"mos:{a.seed}:{a.target}:{which}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    order = list(range(a.pool))
    for i in range(a.pool - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return [order[k * a.shards:(k + 1) * a.shards] for k in range(a.rank)]


def index_tensor(a: MosAttrs, which: str):
    import torch  # checking and costing never load torch (see the package docstring)

    return torch.tensor(shard_index(a, which), dtype=torch.long)  # (rank, shards)


def shard_rows(pool_PS, index_RL):
    """The (r, L·S) matrix whose row k concatenates the pool rows index[k, 0..L-1]."""
    return pool_PS[index_RL].flatten(1)  # (r, L, S) -> (r, L·S)


def shard_columns(pool_PS, index_RL):
    """The (L·S, r) matrix whose column k concatenates the pool rows index[k, 0..L-1]."""
    return shard_rows(pool_PS, index_RL).T


class Mos(AssembledLowRank):
    name = "mos"
    attrs = MosAttrs

    def build(self, ir, targets, index, args, span):
        """One node per target; the targets of one (in, out) share the pools of the
        first of them (by id), to which the others' pool params are tied."""
        rank, pool, L = args["rank"], args["pool"], args.get("shards", 1)
        alpha, seed = float(args.get("alpha") or rank), int(args.get("seed", 0))
        owners: dict[tuple[int, int], str] = {}
        nodes = []
        for t in sorted(targets, key=lambda t: t.id):
            id = adapter_id(t.id, self.name, index)
            widths = (t.attrs.in_features, t.attrs.out_features)
            owner = owners.setdefault(widths, id)
            params = tuple(ParamRecord(f"{id}.{leaf}", (pool, w // L), "adapter",
                                       tied_to=None if owner == id else f"{owner}.{leaf}")
                           for leaf, w in zip(POOLS, widths))
            nodes.append(Node(id, Op.MOS, MosAttrs(rank, pool, L, alpha, seed, t.id), params, span, t.shape))
        return nodes

    def check(self, node, target):
        a, t = node.attrs, target.attrs
        return ("B", "T", t.out_features), [(a.pool, t.in_features // a.shards), (a.pool, t.out_features // a.shards)]

    def lower(self, b, node, x):
        a = node.attrs
        A = b.call(shard_rows, b.param(node, 0), b.constant(node, "index_A", index_tensor(a, "A")))  # (rank, in)
        B = b.call(shard_columns, b.param(node, 1), b.constant(node, "index_B", index_tensor(a, "B")))  # (out, rank)
        h = b.linear(x, A)  # (B, T, rank)
        h = b.linear(h, B)  # (B, T, out)
        return b.call(operator.mul, h, a.alpha / a.rank)

    def init(self, node, leaf, t, g, args, base):
        if leaf == "PB":
            return t.zero_()
        bound = 1.0 / math.sqrt(t.shape[1] * node.attrs.shards)  # LoRA's A: ±1/sqrt(in)
        return t.uniform_(-bound, bound, generator=g)

    def merge(self, node, params, weight, bias):
        a = node.attrs
        PA, PB = params["PA"].double(), params["PB"].double()
        A = shard_rows(PA, PA.new_tensor(shard_index(a, "A")).long())
        B = shard_columns(PB, PB.new_tensor(shard_index(a, "B")).long())
        return weight + (a.alpha / a.rank) * (B @ A).to(weight.dtype), bias


register(Mos())
