"""Kernel swaps: the fx graph's reference code replaced by effc's ops.

`to_fx` lowers every hot op to its torch reference (`rms_norm_ref` written out op by op,
`F.linear` plus LoRA's low-rank path, the dequantize-then-multiply of a quantized
linear, ...). Each swap here names a kernel, the pattern it looks for -- the reference
function itself, traced with torch.fx -- and the effc op that replaces a match. The
matcher (torch.fx's SubgraphMatcher) only takes a match whose inner values have no other
users, so a swap never changes what the graph computes, only how: a run with and without
swaps gives the same results within float rounding (tests/compiler/test_swaps.py).

| kernel | pattern (reference) | replacement |
|---|---|---|
| linear_cross_entropy | loss_sum(F.linear(h, W), targets) | effc::linear_cross_entropy (chunked) |
| quant_linear | F.linear(x, dequantize_int8/int4/nf4(...)[, bias]) | effc::int8_linear, int4_linear, nf4_linear |
| lora_linear | F.linear(x, W[, b]) + F.linear(F.linear(x or dropout(x), A), B) * s | effc::lora_linear |
| rms_norm | rms_norm_ref(x, w, eps) | effc::rms_norm |
| swiglu | swiglu_ref(gate, up) | effc::swiglu |
| rotary | rotary_ref(x, cos, sin, heads) | effc::rotary |

Swaps run in that order: the fused loss takes a quantized head's dequantized weight as its
operand (a (V, D) temporary instead of the (N, V) logits), and a quantized base is claimed
by quant_linear before LoRA's pattern could read its dequantized weight. `swap(gm,
kernels)` applies those named and returns one `Fired` record per replacement, with the IR
nodes (and so the source spans) it covered.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from effc.compiler.plan import COSTED, KERNELS  # noqa: F401 (COSTED: named here for the tests)
from effc.compiler.to_fx import loss_sum
from effc.kernels.quant import dequantize_int4, dequantize_int8, dequantize_nf4
from effc.kernels.rmsnorm import rms_norm_ref
from effc.kernels.rotary import rotary_ref
from effc.kernels.swiglu import swiglu_ref

DEFAULT = KERNELS  # what kernels=None means

# Functions a pattern calls as one node (they are one node in the graph too).
_LEAVES = (rotary_ref, loss_sum, dequantize_int8, dequantize_int4, dequantize_nf4)


# ---------------------------------------------------------------- patterns (the references)

def _lora(x, w, a, b, s):
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s


def _lora_bias(x, w, bias, a, b, s):
    return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * s


def _lora_dropout(x, xd, w, a, b, s):
    return F.linear(x, w) + F.linear(F.linear(xd, a), b) * s


def _lora_dropout_bias(x, xd, w, bias, a, b, s):
    return F.linear(x, w, bias) + F.linear(F.linear(xd, a), b) * s


def _linear_ce(h, w, targets):
    return loss_sum(F.linear(h, w), targets)


def _int8(x, q, scale):
    return F.linear(x, dequantize_int8(q, scale))


def _int8_bias(x, q, scale, bias):
    return F.linear(x, dequantize_int8(q, scale), bias)


def _int4(x, q, scale, zero, group):
    return F.linear(x, dequantize_int4(q, scale, zero, group))


def _int4_bias(x, q, scale, zero, group, bias):
    return F.linear(x, dequantize_int4(q, scale, zero, group), bias)


def _nf4(x, q, group, absmax):
    return F.linear(x, dequantize_nf4(q, group, absmax))


def _nf4_bias(x, q, group, absmax, bias):
    return F.linear(x, dequantize_nf4(q, group, absmax), bias)


# ---------------------------------------------------------------- replacements (the kernels)

def _kernel(name: str) -> Callable:
    """The effc op wrapper a swap calls, imported when first needed."""
    if name == "rms_norm":
        from effc.kernels.rmsnorm import rms_norm
        return rms_norm
    if name == "swiglu":
        from effc.kernels.swiglu import swiglu
        return swiglu
    if name == "rotary":
        from effc.kernels.rotary import rotary
        return rotary
    if name == "lora_linear":
        from effc.kernels.lora import lora_linear
        return lora_linear
    if name == "linear_cross_entropy":
        from effc.kernels.linear_ce import linear_cross_entropy
        return linear_cross_entropy
    from effc.kernels import quant as Q
    return {"int8_linear": Q.int8_linear, "int4_linear": Q.int4_linear, "nf4_linear": Q.nf4_linear}[name]


@dataclass(frozen=True)
class Pattern:
    kernel: str  # the plan's name for it (KERNELS)
    op: str  # the effc op that replaces it
    reference: Callable  # traced into the pattern graph
    args: Callable[[dict], tuple]  # the replacement's arguments from the matched placeholders


def _patterns() -> list[Pattern]:
    lora = lambda m: (m["x"], m["w"], m.get("bias"), m["a"], m["b"], m["s"], m.get("xd"))  # noqa: E731
    return [
        # first: a quantized head's dequantized weight is then the fused loss's operand
        # (a (V, D) temporary instead of the (N, V) logits)
        Pattern("linear_cross_entropy", "linear_cross_entropy", _linear_ce, lambda m: (m["h"], m["w"], m["targets"])),
        Pattern("quant_linear", "int8_linear", _int8, lambda m: (m["x"], m["q"], m["scale"], None)),
        Pattern("quant_linear", "int8_linear", _int8_bias, lambda m: (m["x"], m["q"], m["scale"], m["bias"])),
        Pattern("quant_linear", "int4_linear", _int4,
                lambda m: (m["x"], m["q"], m["scale"], m["zero"], m["group"], None)),
        Pattern("quant_linear", "int4_linear", _int4_bias,
                lambda m: (m["x"], m["q"], m["scale"], m["zero"], m["group"], m["bias"])),
        Pattern("quant_linear", "nf4_linear", _nf4, lambda m: (m["x"], m["q"], m["absmax"], m["group"], None)),
        Pattern("quant_linear", "nf4_linear", _nf4_bias,
                lambda m: (m["x"], m["q"], m["absmax"], m["group"], m["bias"])),
        Pattern("lora_linear", "lora_linear", _lora_dropout_bias, lora),
        Pattern("lora_linear", "lora_linear", _lora_dropout, lora),
        Pattern("lora_linear", "lora_linear", _lora_bias, lora),
        Pattern("lora_linear", "lora_linear", _lora, lora),
        Pattern("rms_norm", "rms_norm", rms_norm_ref, lambda m: (m["x"], m["w"], m["eps"])),
        Pattern("swiglu", "swiglu", swiglu_ref, lambda m: (m["gate"], m["up"])),
        Pattern("rotary", "rotary", rotary_ref, lambda m: tuple(m.values())),  # x, cos, sin, heads
    ]


@cache
def _traced(fn: Callable) -> fx.Graph:
    """The pattern graph of a reference: its body traced, with the leaf functions kept as
    single calls (a leaf is itself the pattern: rotary_ref)."""
    if fn in _LEAVES:
        g = fx.Graph()
        names = list(inspect.signature(fn).parameters)
        g.output(g.call_function(fn, tuple(g.placeholder(n) for n in names)))
        return g
    return fx.Tracer(autowrap_functions=_LEAVES).trace(fn)


# ---------------------------------------------------------------- the pass

@dataclass(frozen=True)
class Fired:
    """One replacement: the kernel, the effc op now called, the fx node that calls it, and
    the IR nodes the replaced reference code was lowered from (in graph order)."""

    kernel: str
    op: str
    node: str
    ir: tuple[str, ...]

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "op": f"effc::{self.op}", "node": self.node, "ir": list(self.ir)}


def resolve(kernels) -> tuple[str, ...]:
    """None or "all": every kernel; () or "none": no swap; else the names, in KERNELS order."""
    if kernels is None:
        return DEFAULT
    if kernels == "all":
        return KERNELS
    if kernels == "none":
        return ()
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel {unknown[0]!r}; the kernels are {', '.join(KERNELS)}")
    return tuple(k for k in KERNELS if k in kernels)


def swap(gm: fx.GraphModule, kernels=None) -> list[Fired]:
    """Replace, in place, every match of the enabled kernels' patterns; recompile."""
    enabled = resolve(kernels)
    fired: list[Fired] = []
    g = gm.graph
    # Graph order of the reference nodes: a match is made of these only (replacements are
    # effc ops, which no pattern contains), and erasing nodes keeps the others' order.
    order = {n: i for i, n in enumerate(g.nodes)}
    for pat in _patterns():
        if pat.kernel not in enabled:
            continue
        pg = _traced(pat.reference)
        names = [n.name for n in pg.nodes if n.op == "placeholder"]
        matcher = SubgraphMatcher(pg, match_output=False, match_placeholder=False, remove_overlapping_matches=True)
        for m in matcher.match(g):
            if any(n.graph is not g or n._erased for n in m.nodes_map.values() if isinstance(n, fx.Node)):
                continue  # overlapped a replacement made by an earlier pattern
            fired.append(_replace(g, pat, m, names, order))
    if fired:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
        _drop_dead_names(gm)
    return fired


def _replace(g: fx.Graph, pat: Pattern, m, names: list[str], order: dict) -> Fired:
    values: dict[str, Any] = dict(zip(names, m.placeholder_nodes))
    anchor = m.returning_nodes[0]
    inner = sorted((gn for pn, gn in m.nodes_map.items() if pn.op not in ("placeholder", "output")),
                   key=order.__getitem__)
    covered = tuple(dict.fromkeys(n.meta["ir"] for n in inner if "ir" in n.meta))
    with g.inserting_before(anchor):
        new = g.call_function(_kernel(pat.op), pat.args(values))
    new.meta.update(anchor.meta)
    new.meta["swap"] = pat.kernel
    name = anchor.name
    anchor.replace_all_uses_with(new)
    for n in reversed(inner):
        if not n.users:
            g.erase_node(n)
    new.name = name
    return Fired(pat.kernel, pat.op, new.name, covered)


def _drop_dead_names(gm: fx.GraphModule) -> None:
    """Keep gm.meta["ir_nodes"] (IR id -> fx node name, read by calibration) pointing at
    nodes that still exist: a replaced output keeps its name; dropped ones leave."""
    live = {n.name for n in gm.graph.nodes}
    names = gm.meta.get("ir_nodes")
    if names:
        gm.meta["ir_nodes"] = {k: v for k, v in names.items() if v in live}
