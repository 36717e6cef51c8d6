"""Soft prompts (Lester et al. 2021, arXiv:2104.08691): n trained embeddings of virtual
tokens prepended to every sequence; the model is frozen.

The node adapts the token embedding: `after` turns the embedded tokens (B, T, D) into
(B, n + T, D) with the prompt P (n, D) in front, the same P for every sequence. The
graph then reads n + T positions (`prefix`): rotary tables and learned positions run
over them, causal attention lets every token see the whole prompt, a packed row's
records each see it (segment -1) and count their positions on from n, and the loss
(or the logits, or an encoder's mean pool) reads the input's own T positions only. So
the logits at the input's positions equal PEFT's prompt tuning (`PromptTuningConfig`,
which prepends the same way and labels the virtual positions -100).

Param P (n, D). Init: init=vocab (the paper's recommendation, PEFT's SAMPLE_VOCAB) copies
the embedding rows of n seeded random token ids; init=random draws N(0, 0.02), effc's
embedding init. No merge: a prompt is input positions, not a change to any weight.
A prompt is applied after every other adapter of the embedding (they act on the
tokens' own positions).

Cost: P's gradient is the sum over the batch of the gradient at the first n positions:
nothing is saved for it. Everything per token costs n more positions a sequence (the
cost model counts seq + n).
"""

from __future__ import annotations

from dataclasses import dataclass

from effc.compiler.adapters import AdapterKind, CannotMerge, adapter_param, register
from effc.compiler.ir import Node, Op


@dataclass(frozen=True)
class PromptAttrs:
    length: int
    dim: int
    target: str  # the token EMBEDDING


def prepend(y_BTD, prompt_ND):
    """The prompt in front of every sequence: (B, T, D), (n, D) -> (B, n + T, D)."""
    import torch  # here, not at import: checking and costing never load torch

    return torch.cat((prompt_ND.expand(y_BTD.shape[0], -1, -1), y_BTD), dim=1)


class Prompt(AdapterKind):
    name = "prompt"
    attrs = PromptAttrs
    additive = False
    target_ops = frozenset({Op.EMBEDDING})

    def target(self, ir, path):
        return "embed"  # `adapt m with prompt(...)` selects the model: its token embedding

    def make(self, target, id, args, span, ir):
        a = PromptAttrs(args["length"], target.attrs.dim, target.id)
        return Node(id, Op.PROMPT, a, (adapter_param(id, "embeddings", (a.length, a.dim)),), span, ())

    def check(self, node, target):
        return (), [(node.attrs.length, target.attrs.dim)]

    def prefix(self, node):
        return node.attrs.length

    def lower(self, b, node, x):
        return b.param(node, 0)

    def after(self, b, node, value, y):
        return b.call(prepend, y, value)

    def init(self, node, leaf, t, g, args, base):
        if args.get("init", "vocab") == "random":
            return t.normal_(0.0, 0.02, generator=g)
        W = base["weight"]  # (vocab, D)
        ids = t.new_empty(t.shape[0]).random_(0, W.shape[0], generator=g).long()
        return t.copy_(W[ids])

    def merge(self, node, params, weight, bias):
        raise CannotMerge("a soft prompt is extra input positions, not a change to any weight")

    def flops(self, ir, node, rg):
        return 0, 0  # a copy in front of the sequence; the n extra positions are counted as tokens


register(Prompt())
