"""Bottleneck adapters on attention and MLP sublayers: a small two-layer network whose
output is added to the sublayer's output.

    series   (Houlsby et al. 2019, arXiv:1902.00751):  y' = y + s · up(relu(down(y)))
    parallel (He et al. 2022, arXiv:2110.04366):       y' = y + s · up(relu(down(h)))

where y is the sublayer's output, before the residual add (the output of its projection
`attn.o` or `mlp.down`, pre-norm or BERT's post-norm alike), h the sublayer's input
(what `attn.q` or `mlp.up` reads), down(v) = v D^T + d and up(v) = v U^T + u, and s the
`scale` (He et al.'s scaled parallel adapter; Houlsby's s = 1). A statement selects
sublayers (`layers[*].mlp`, or `layers[*]` for both of each block); the node adapts the
sublayer's output projection (`target`). Series: its input is the projection's output,
which exists only once the projection has run, so the node reads nothing (an edge from
the projection would close a cycle), its value is its own D (as IA3's value is its
vector), and `after` computes the whole update. Parallel: the node reads h (`source`)
and its value is the update, which the projection adds.

Params D "down" (size, f) and d "down_bias" (size,), U "up" (dim, size) and u
"up_bias" (dim,), with f the width down reads (dim for both modes in every supported
family). Init: D and d as torch's nn.Linear (uniform ±1/sqrt(f)), U = 0 and u = 0, so
training starts from the base model. No merge: relu(...) is no linear map, so no weight
can absorb it (CannotMerge; the checker refuses merge_adapters=true, E0409).

Composition (additive = True): other adapters on the projection add updates computed
from the projection's input; each adapter's `after` runs in declaration order, so a
series adapter reads y with the updates declared before it and not those after it:
`lora` then `bottleneck` adapts the LoRA-adapted sublayer (Houlsby's placement), the
other order adds the LoRA update beside the adapter. Either is one exact, well-defined
function (the graph and the incremental decoder run the same hooks in the same order),
and neither is merged, so no order can disagree with a merge.

Cost: when the adapter trains, down saves its input (h, shared with the graph; or y,
private to the adapter: dim per token) and relu's output (size per token, also up's
saved input); frozen, only relu's output when the input needs a gradient. Forward
temporaries: down's pre-activation (size), up's output (dim) and, in series, its scaled
copy (dim). FLOPs 2 · (size · f + dim · size) forward per token; backward: up's input
gradient (2 · dim · size) whenever down or the input needs a gradient, down's (2 · size
· f) when the input needs one, and 2 · (size · f + dim · size) for the weight gradients.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from effc.compiler.adapters import AdapterKind, CannotMerge, adapter_index, adapter_param, adapters_of, register
from effc.compiler.ir import IR, Node, Op

# A sublayer's output projection (the target) and the projection reading its input (h).
OUTPUT = {"attn": "o", "mlp": "down"}
INPUT = {"attn": "q", "mlp": "up"}


@dataclass(frozen=True)
class BottleneckAttrs:
    size: int
    mode: str  # "series" | "parallel"
    scale: float
    features: int  # the width down reads: the sublayer's output (series) or input (parallel)
    target: str  # the sublayer's output projection, `layers[0].attn.o` or `layers[0].mlp.down`


def relu(x):
    return x.relu()


def _input_of(target: str) -> str:
    """The projection whose input is the sublayer's input: `layers[0].mlp.down` -> `layers[0].mlp.up`."""
    sublayer, _, _ = target.rpartition(".")
    return f"{sublayer}.{INPUT[sublayer.rpartition('.')[2]]}"


def _update(b, node: Node, v):
    """s · up(relu(down(v))) = s · (relu(v D^T + d) U^T + u), (B, T, f) -> (B, T, dim): two
    linears with their biases."""
    h = b.linear(v, b.param(node, 0), b.param(node, 1))  # (B, T, size)
    h = b.call(relu, h)
    h = b.linear(h, b.param(node, 2), b.param(node, 3))  # (B, T, dim)
    return b.call(operator.mul, h, node.attrs.scale)


def _reads_grad(ir: IR, node: Node, rg: dict[str, bool]) -> bool:
    """Whether what down reads needs a gradient: h's node, or in series the projection's
    input and the adapters declared before this one (their updates are in y)."""
    if node.attrs.mode == "parallel":
        return rg[ir.inputs(node.id)[0]]
    target = node.attrs.target
    earlier = [m for m in adapters_of(ir, target) if adapter_index(m.id) < adapter_index(node.id)]
    return rg[ir.inputs(target)[0]] or any(rg[m.id] for m in earlier)


class Bottleneck(AdapterKind):
    name = "bottleneck"
    attrs = BottleneckAttrs

    def target(self, ir, path):
        return f"{path}.{OUTPUT[path.rpartition('.')[2]]}"

    def make(self, target, id, args, span, ir):
        t = target.attrs
        mode, size = args.get("mode", "series"), args["size"]
        f = t.out_features if mode == "series" else ir.node(ir.inputs(_input_of(target.id))[0]).shape[-1]
        attrs = BottleneckAttrs(size, mode, float(args.get("scale", 1.0)), f, target.id)
        params = (adapter_param(id, "down", (size, f)), adapter_param(id, "down_bias", (size,)),
                  adapter_param(id, "up", (t.out_features, size)), adapter_param(id, "up_bias", (t.out_features,)))
        # Series: the value is D, a param (no per-token width); parallel: the update.
        return Node(id, Op.BOTTLENECK, attrs, params, span, () if mode == "series" else target.shape)

    def source(self, ir, node):
        a = node.attrs
        return ir.inputs(_input_of(a.target))[0] if a.mode == "parallel" else None

    def check(self, node, target):
        a, out = node.attrs, target.attrs.out_features
        f = out if a.mode == "series" else a.features
        shape = () if a.mode == "series" else ("B", "T", out)
        return shape, [(a.size, f), (a.size,), (out, a.size), (out,)]

    def lower(self, b, node, x):
        return b.param(node, 0) if node.attrs.mode == "series" else _update(b, node, x)

    def after(self, b, node, value, y):
        update = _update(b, node, y) if node.attrs.mode == "series" else value
        return b.call(operator.add, y, update)

    def init(self, node, leaf, t, g, args, base):
        if leaf.startswith("up"):
            return t.zero_()
        bound = 1.0 / math.sqrt(node.attrs.features)  # nn.Linear's default for D and d: fan-in f
        return t.uniform_(-bound, bound, generator=g)

    def merge(self, node, params, weight, bias):
        raise CannotMerge("a bottleneck adapter is a small nonlinear network (up(relu(down(h)))), which no weight "
                          "of the model can absorb")

    def saved(self, ir, node, rg):
        a = node.attrs
        trains = node.params[0].trainable
        relu_out = 4 * a.size * (trains or _reads_grad(ir, node, rg))
        if a.mode == "parallel":
            return ({ir.inputs(node.id)[0]} if trains else set()), relu_out
        return set(), relu_out + 4 * a.features * trains  # y is private: the projection's output before the update

    def forward_temporaries(self, ir, node):
        out = node.params[2].shape[0]
        return node.attrs.size + out * (2 if node.attrs.mode == "series" else 1)

    def flops(self, ir, node, rg):
        a = node.attrs
        down, up = a.size * a.features, node.params[2].numel
        reads, trains = _reads_grad(ir, node, rg), node.params[0].trainable
        return 2 * (down + up), 2 * up * (reads or trains) + 2 * down * reads + 2 * (down + up) * trains


register(Bottleneck())
