"""Embedding-row tuning (Yuan et al. 2024, KS-Lottery, arXiv:2402.02801): only chosen rows
of the token embedding train; every other weight, the rest of the table included, stays
frozen. KS-Lottery finds that fine-tuning a handful of token embeddings (18 for LLaMA's
translation transfer) reaches full fine-tuning; it picks them by a Kolmogorov-Smirnov
test on an embedding fine-tuned in full. effc trains rows the file names (`rows=[ids]`,
for instance such tickets), or the `count` most frequent token ids of `calibrate` data
(its train split, or the split named; ties to the smaller id), a cheap rule that needs
no full fine-tune first; `effc run` chooses them when it first builds the model.

With index (N,) the chosen ids (sorted) and R (N, D) their trained values, the table is
W with W[index] replaced by R. The lookup stays partial: a slot map of the vocabulary
(slot[index[j]] = j, N elsewhere; (V,) int64, rebuilt each step from the index) sends
each token to its row of R or to none, and

    out = where(slot[t] < N, R[min(slot[t], N - 1)], W[t])

so R's gradient is exactly the output gradient summed over the tokens that hit each
row (the lookup's backward adds zeros for the others), and no (V, D) gradient or mask
is ever made. A tied head (decoder(..., tied=true), Qwen2, GPT-2: the head reads W) must
read R too: `build` adds a companion node on that head whose params are tied to the
embedding node's, adding h (R - W[index])^T into the logit columns index. Its backward
recomputes the (N, D) difference rather than saving it (an autograd Function), so
nothing per step is kept; W is frozen, since a model with adapters trains only them.

Params R "rows" (N, D), trained, and index (N,) int64, frozen and stored, so snapshots,
exports and generate never need the calibration data again. Init: index the chosen ids,
R = W[index]: the rows train in place, as in the paper, and AdamW's weight decay pulls
them toward 0 as it would a fully trained table (a delta would decay toward W instead).
Merge: W[index] = R, a copy, so exact; the head's merge returns its weight untouched,
so the merged head stays tied to the updated embedding.

Cost: optimizer state 2 · N · D floats. Saved per token when R trains: the clamped slot
(int64) and the hit mask (1 byte); the head saves h (dim, shared with the graph) and
the N columns it added (torch's index_add keeps its source for the backward's shape).
Forward temporaries: W[t] and R[slot] (dim each) and the slot, its clamped copy and the
mask (17 bytes). FLOPs: the lookup none; the head 2 · N · D forward per token, and as
much for h's gradient and again for R's. The slot map ((V,) int64) and the head's
difference ((N, D)) are per step, not per token, and not counted.

Legend: B batch, T tokens, D dim, V vocab, N chosen rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from effc.compiler.adapters import AdapterKind, adapter_id, adapter_param, register
from effc.compiler.ir import Node, Op

ID_BYTES, MASK_BYTES = 8, 1


@dataclass(frozen=True)
class EmbeddingRowsAttrs:
    count: int  # N, the rows that train
    part: str  # "embedding": the table's lookup; "head": a tied head's logit columns
    target: str  # the token EMBEDDING, or the LINEAR head tied to it


def frequent_rows(tokens, vocab: int, count: int) -> list[int]:
    """The `count` most frequent ids of a (n,) int64 token tensor, ties to the smaller id,
    sorted. Ids at or above `vocab` are the caller's to refuse first."""
    freq = tokens.bincount(minlength=vocab)
    return sorted(freq.argsort(descending=True, stable=True)[:count].tolist())


def chosen_rows(args: dict) -> list[int]:
    rows = args.get("rows")
    if rows is None:  # count= with calibrate=: `effc run` fills `rows` from the data
        raise ValueError("embedding_rows(count=..., calibrate=...) has no rows chosen: they come from the "
                         "calibration data when the run builds the model")
    return sorted(rows)


def rows_lookup(y_BTD, tokens_BT, rows_ND, index_N, vocab: int):
    """W[t] with the rows index read from R: y_BTD = W[t], the frozen lookup."""
    import torch  # here, not at import: checking and costing never load torch
    import torch.nn.functional as F

    N = index_N.shape[0]
    slot_V = index_N.new_full((vocab,), N)
    slot_V[index_N] = torch.arange(N, device=index_N.device)
    s_BT = slot_V[tokens_BT]
    hit_BT1 = (s_BT < N).unsqueeze(-1)
    return torch.where(hit_BT1, F.embedding(s_BT.clamp(max=N - 1), rows_ND), y_BTD)


@functools.cache
def _tied_rows():
    import torch

    class TiedRows(torch.autograd.Function):
        """h (R - W[index])^T; backward recomputes R - W[index] from the params."""

        @staticmethod
        def forward(ctx, h_BTD, rows_ND, W_VD, index_N):
            ctx.save_for_backward(h_BTD, rows_ND, W_VD, index_N)
            return h_BTD @ (rows_ND - W_VD[index_N]).T

        @staticmethod
        def backward(ctx, g_BTN):
            h_BTD, rows_ND, W_VD, index_N = ctx.saved_tensors
            dh = g_BTN @ (rows_ND - W_VD[index_N]) if ctx.needs_input_grad[0] else None
            drows = g_BTN.flatten(0, -2).T @ h_BTD.flatten(0, -2) if ctx.needs_input_grad[1] else None
            return dh, drows, None, None  # W is frozen (assign_roles); the index has no gradient

    return TiedRows.apply


def tied_rows_logits(h_BTD, rows_ND, W_VD, index_N):
    """What the tied head's logit columns `index` lack: h (R - W[index])^T, (B, T, D) -> (B, T, N)."""
    return _tied_rows()(h_BTD, rows_ND, W_VD, index_N)


def add_columns(y_BTV, index_N, v_BTN):
    """y with v added into the columns index: (B, T, V), (N,), (B, T, N) -> (B, T, V)."""
    return y_BTV.index_add(-1, index_N, v_BTN)


def _params(id: str, count: int, dim: int):
    rows = adapter_param(id, "rows", (count, dim))
    return rows, replace(adapter_param(id, "index", (count,)), dtype="int64", trainable=False)


class EmbeddingRows(AdapterKind):
    name = "embedding_rows"
    attrs = EmbeddingRowsAttrs
    target_ops = frozenset({Op.EMBEDDING, Op.LINEAR})  # the token embedding, and a head tied to it

    def make(self, target, id, args, span, ir):
        rows = args.get("rows")
        count = len(rows) if rows is not None else args["count"]
        # The value is R itself, a param: no per-token width.
        return Node(id, Op.EMBEDDING_ROWS, EmbeddingRowsAttrs(count, "embedding", target.id),
                    _params(id, count, target.attrs.dim), span, ())

    def build(self, ir, targets, index, args, span):
        nodes = []
        for t in targets:
            node = self.make(t, adapter_id(t.id, self.name, index), args, span, ir)
            nodes.append(node)
            table = t.params[0].path
            for head in [n for n in ir.nodes() if n.op is Op.LINEAR and n.params[0].tied_to == table]:
                id = adapter_id(head.id, self.name, index)
                tied = tuple(replace(p, path=f"{id}.{p.path.rsplit('.', 1)[1]}", tied_to=p.path)
                             for p in node.params)
                nodes.append(Node(id, Op.EMBEDDING_ROWS, EmbeddingRowsAttrs(node.attrs.count, "head", head.id),
                                  tied, span, ("B", "T", node.attrs.count)))
        return nodes

    def check(self, node, target):
        a = node.attrs
        dim = target.attrs.dim if a.part == "embedding" else target.attrs.in_features
        shape = () if a.part == "embedding" else ("B", "T", a.count)
        return shape, [(a.count, dim), (a.count,)]

    def lower(self, b, node, x):
        if node.attrs.part == "embedding":
            return b.param(node, 0)
        head = b.ir.node(node.attrs.target)
        return b.call(tied_rows_logits, x, b.param(node, 0), b.param(head, 0), b.param(node, 1))

    def after(self, b, node, value, y):
        if node.attrs.part == "head":
            return b.call(add_columns, y, b.param(node, 1), value)
        vocab = b.ir.node(node.attrs.target).attrs.vocab
        return b.call(rows_lookup, y, b.tokens, value, b.param(node, 1), vocab)

    def init(self, node, leaf, t, g, args, base):
        rows = chosen_rows(args)
        if leaf == "index":
            return t.copy_(t.new_tensor(rows))
        return t.copy_(base["weight"][rows])

    def merge(self, node, params, weight, bias):
        if node.attrs.part == "head":
            return weight, bias  # the embedding's merge updated the weight this head reads
        out = weight.clone()
        out[params["index"]] = params["rows"].to(weight.dtype)
        return out, bias

    def saved(self, ir, node, rg):
        if not node.params[0].trainable:
            return set(), 0
        if node.attrs.part == "head":  # h for R's gradient; index_add keeps the columns it added
            return {ir.inputs(node.id)[0]}, 4 * node.attrs.count
        return set(), ID_BYTES + MASK_BYTES

    def forward_temporaries(self, ir, node):
        if node.attrs.part == "head":
            return 0
        dim = node.params[0].shape[1]
        return 2 * dim + math.ceil((2 * ID_BYTES + MASK_BYTES) / 4)  # W[t], R[slot]; slot, clamped slot, mask

    def flops(self, ir, node, rg):
        if node.attrs.part == "embedding":
            return 0, 0  # a lookup
        return super().flops(ir, node, rg)


register(EmbeddingRows())
