"""PaCA (Woo et al. 2025, arXiv:2503.01905): partial connection adaptation.

A fixed random choice of `count` = round(fraction · in) input columns of the target's
weight W (out, in) trains in place; the rest of W stays frozen. With idx those columns
and P (out, count) their trained values, the layer is the linear of W with W[:, idx]
replaced by P, computed as

    y = x_rest W^T + x[..., idx] P^T + bias,   x_rest = x with the columns idx set to 0

which is exact (each input column meets exactly one weight column: P's for idx, W's
otherwise) and really partial: autograd saves only the gathered input x[..., idx]
(count floats per token) for P's gradient dY^T x_idx (out, count), never a masked
(out, in) gradient; the frozen matmul saves nothing (W needs no gradient), the index
ops only the index. The paper's y = x W^T + x_idx (P - W[:, idx])^T would keep the
(out, count) difference for the input gradient, a per-step tensor the per-token cost
model cannot count; zeroing idx in x costs instead one in-wide temporary per token
during the target's matmul. At init P = W[:, idx], so the output is the base model's up
to the order of float additions.

The columns: the first `count` positions of a Fisher–Yates shuffle of range(in) driven
by `random.Random(f"paca:{seed}:{target}").random()`, sorted. Python guarantees that
sequence for a string seed, so the choice depends only on (seed, target id): not on
torch, the run's seed or the order weights are built in, and the IR keeps (count, seed)
alone. The graph holds the index as a constant (`b.constant`), never stored.

Param P "columns" (out, count). Init: W[:, idx], so AdamW's weight decay pulls the
trained columns toward 0 as it would the paper's in-place weights. Merge: W[:, idx] = P,
exact; the bias is unchanged. PaCA replaces part of its weight, so it is the only
adapter on its weight (an earlier adapter's merge would be overwritten in idx).

Cost: saves x_idx (count per token) when P trains; forward temporaries: x_rest (in per
token) beside the target's matmul; FLOPs as a matmul by P (2 · out · count forward;
backward 2 · out · count for P, and as much again for the input gradient when the input
needs one), on top of the target's full matmul. tests/runtime/test_partial_memory.py
measures the saved bytes and AdamW's state against these counts, and
tests/compiler/test_adapter_partial.py the FLOPs against torch's FlopCounterMode. Unlike
the paper's in-place kernel, P is held beside W, whose columns idx stay (read as
zeros): out · count more weight floats, and the frozen matmul still spans all of in.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from effc.compiler.adapters import AdapterKind, adapter_param, register
from effc.compiler.ir import Node, Op


@dataclass(frozen=True)
class PacaAttrs:
    count: int  # columns that train: round(fraction · in_features)
    seed: int
    target: str


def column_count(fraction: float, in_features: int) -> int:
    """round(fraction · in), Python's round (half to even), as the checker computes it."""
    return round(fraction * in_features)


@functools.lru_cache(maxsize=4096)
def paca_columns(seed: int, target: str, in_features: int, count: int) -> tuple[int, ...]:
    """The trained input columns of one weight, sorted (see the module docstring)."""
    rng = random.Random(f"paca:{seed}:{target}")
    cols = list(range(in_features))
    for i in range(count):  # partial Fisher–Yates: position i takes a uniform pick of i..in-1
        j = i + int(rng.random() * (in_features - i))
        cols[i], cols[j] = cols[j], cols[i]
    return tuple(sorted(cols[:count]))


def gather_columns(x, idx):
    """x[..., idx]: (..., in) -> (..., count); its backward keeps only idx."""
    return x.index_select(-1, idx)


def drop_columns(x, idx):
    """x with the columns idx set to 0, the input of the frozen matmul; its backward keeps only idx."""
    return x.index_fill(-1, idx, 0.0)


def _index(b, node: Node):
    import torch  # checking and costing never get here
    a = node.attrs
    in_features = b.ir.node(a.target).attrs.in_features
    return b.constant(node, "index", torch.tensor(paca_columns(a.seed, a.target, in_features, a.count),
                                                  dtype=torch.long))


class Paca(AdapterKind):
    name = "paca"
    attrs = PacaAttrs
    additive = False

    def make(self, target, id, args, span, ir):
        t = target.attrs
        attrs = PacaAttrs(column_count(args["fraction"], t.in_features), int(args.get("seed", 0)), target.id)
        return Node(id, Op.PACA, attrs, (adapter_param(id, "columns", (t.out_features, attrs.count)),), span,
                    target.shape)

    def check(self, node, target):
        t = target.attrs
        return ("B", "T", t.out_features), [(t.out_features, node.attrs.count)]

    def lower(self, b, node, x):
        h = b.call(gather_columns, x, _index(b, node))  # (B, T, count)
        return b.linear(h, b.param(node, 0))  # (B, T, out)

    def before(self, b, node, value, x):
        return b.call(drop_columns, x, _index(b, node))

    def init(self, node, leaf, t, g, args, base):
        a = node.attrs
        W = base["weight"]
        idx = paca_columns(a.seed, a.target, W.shape[1], a.count)
        return t.copy_(W[:, list(idx)])

    def merge(self, node, params, weight, bias):
        a = node.attrs
        idx = list(paca_columns(a.seed, a.target, weight.shape[1], a.count))
        out = weight.clone()
        out[:, idx] = params["columns"].to(weight.dtype)
        return out, bias

    def saved(self, ir, node, rg):
        return set(), 4 * node.attrs.count * node.params[0].trainable

    def forward_temporaries(self, ir, node):
        return ir.node(node.attrs.target).attrs.in_features  # x_rest, read by the target's matmul


register(Paca())
