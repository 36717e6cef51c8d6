"""IA3 (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale activations.

On a linear layer the vector l scales either its output, y = l ⊙ (x W^T + bias) (the
paper's keys and values), or its input, y = (l ⊙ x) W^T + bias (the paper's scaling of
the MLP's intermediate activation, which is the input of its down projection): PEFT's
IA3 scales the input of its `feedforward_modules` and the output of the others. effc's
`ia3` scales the input of an MLP's down projection and the output of any other target.

Param l: (out,) on the output, (in,) on the input. Init: ones, so training starts from
the base model. Merge, exact: W' = diag(l) W and bias' = l ⊙ bias, or W' = W diag(l).
IA3 rescales the weight, so it is the only adapter on its weight.

Cost: on the output it saves x W^T + bias (out per token) for l's gradient; on the input,
x (its gradient needs the unscaled input), and the target's matmul then needs an input
gradient even when x needs none (2 · in · out per token). The elementwise products are
not counted as FLOPs, as norms are not.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from effc.compiler.adapters import AdapterKind, adapter_param, register
from effc.compiler.ir import Node, Op


@dataclass(frozen=True)
class Ia3Attrs:
    features: int
    scales: str  # "output" | "input"
    target: str


def scales_input(target: str, args: dict) -> bool:
    """The rule above; a PEFT import names its feedforward modules instead (`inputs`)."""
    inputs = args.get("inputs")
    return target in inputs if inputs is not None else target.endswith(".mlp.down")


class Ia3(AdapterKind):
    name = "ia3"
    attrs = Ia3Attrs
    additive = False

    def make(self, target, id, args, span, ir):
        t = target.attrs
        on_input = scales_input(target.id, args)
        n = t.in_features if on_input else t.out_features
        # The node's value is the vector itself, a param: no per-token width.
        return Node(id, Op.IA3, Ia3Attrs(n, "input" if on_input else "output", target.id),
                    (adapter_param(id, "l", (n,)),), span, ())

    def check(self, node, target):
        t = target.attrs
        n = t.in_features if node.attrs.scales == "input" else t.out_features
        return (), [(n,)]

    def lower(self, b, node, x):
        return b.param(node, 0)

    def before(self, b, node, value, x):
        return b.call(operator.mul, x, value) if node.attrs.scales == "input" else x

    def after(self, b, node, value, y):
        return b.call(operator.mul, y, value) if node.attrs.scales == "output" else y

    def init(self, node, leaf, t, g, args, base):
        return t.fill_(1.0)

    def merge(self, node, params, weight, bias):
        l = params["l"].double()
        if node.attrs.scales == "input":
            return (weight.double() * l[None, :]).to(weight.dtype), bias
        scaled_bias = None if bias is None else (bias.double() * l).to(bias.dtype)
        return (weight.double() * l[:, None]).to(weight.dtype), scaled_bias

    def saved(self, ir, node, rg):
        if not node.params[0].trainable:
            return set(), 0
        if node.attrs.scales == "input":
            return {ir.inputs(node.id)[0]}, 0
        return set(), 4 * node.attrs.features

    def forward_temporaries(self, ir, node):
        return node.attrs.features if node.attrs.scales == "input" else 0  # l ⊙ x

    def flops(self, ir, node, rg):
        x = ir.inputs(node.id)[0]
        if node.attrs.scales == "input" and not rg[x]:
            w = ir.node(node.attrs.target).params[0].numel
            return 0, 2 * w  # the target's input gradient, which reaches l
        return 0, 0


register(Ia3())
