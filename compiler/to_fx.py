"""Lowering the IR to a torch.fx graph: the program the runtime executes.

`to_fx(ir, seq)` turns each IR node, in topological order, into fx nodes that call the
effc kernels (`effc.kernels.*`: the CPU paths now, Triton on GPU later) or plain torch
functions, so the graph mirrors the IR one to one and `effc show --fx` reads like it.
The graph takes `tokens` and `targets` (B, T) int64 and returns the *sum* of the token
cross-entropies over targets that are not -100: summing (not averaging) lets gradient
accumulation and evaluation divide by the exact token count of a whole step. Both also
take optional `segments` and `positions` (B, T) int64 for packed sequences: attention
never crosses from one record to another, and positions restart at each record. An encoder's
graph (its IR ends in POOL) takes `tokens` and `keep` (B, T) bool, True for real tokens,
and returns the (B, dim) mean of the last hidden states over the real tokens.

Parameters live on a module tree whose qualified names are the canonical paths with
`[i]` written `.i` (`layers[0].attn.q.weight` -> `layers.0.attn.q.weight`), so a state
dict reads like the IR. A tied param (`tied_to`) is not a separate tensor: the graph
reads the one it is tied to. Tensors are created on `device` with `torch.empty`; pass
`torch.device("meta")` to build a graph without allocating a byte (what `effc build` does).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effc.compiler.adapters import adapters_of, kind_of, prefix_length
from effc.compiler.ir import ADAPTERS, IR, OUTPUTS, IRError, Node, Op, ParamRecord
from effc.kernels import quant as Q
from effc.kernels.attention import attention
from effc.kernels.dropout import Dropout
from effc.kernels.rmsnorm import rms_norm_ref
from effc.kernels.rotary import at_positions, rotary_ref, rotary_tables
from effc.kernels.swiglu import swiglu_ref

IGNORE = -100  # a target the loss skips (prompt tokens, padding)


def fx_name(path: str) -> str:
    """Canonical path -> torch qualified name: `layers[0].attn.q` -> `layers.0.attn.q`."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def add_positions(x_BTD: torch.Tensor, table_RD: torch.Tensor, positions_BT: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x plus the table's row t at position t (learned absolute positions); with packed
    sequences, the row of each token's position within its record."""
    if positions_BT is None:
        return x_BTD + table_RD[: x_BTD.shape[1]]
    return x_BTD + table_RD[positions_BT]


def add_type0(x_BTD: torch.Tensor, table_RD: torch.Tensor) -> torch.Tensor:
    """x plus token-type row 0: effc feeds one segment per sequence, as Hugging Face does
    when no token_type_ids are given."""
    return x_BTD + table_RD[0]


def mean_pool(h_BTD: torch.Tensor, keep_BT: torch.Tensor) -> torch.Tensor:
    """The mean of h over the positions where keep is True: (B, T, D) -> (B, D)."""
    w_BT1 = keep_BT.unsqueeze(-1).to(h_BTD.dtype)
    return (h_BTD * w_BT1).sum(1) / w_BT1.sum(1).clamp(min=1.0)


def prefix_segments(segments_BT: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A packed row's record numbers over n prepended positions (soft prompts): -1 there,
    a key that every record may see (`effc.kernels.attention`). None (a row of one
    sequence) stays None."""
    if segments_BT is None:
        return None
    return torch.cat((segments_BT.new_full((segments_BT.shape[0], n), -1), segments_BT), dim=1)


def prefix_positions(positions_BT: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Positions over n prepended positions: 0..n-1, then each record's counted on from n,
    so every record reads as if it followed the prompt alone. None stays None."""
    if positions_BT is None:
        return None
    head = torch.arange(n, device=positions_BT.device).expand(positions_BT.shape[0], n)
    return torch.cat((head, positions_BT + n), dim=1)


def prefix_keep(keep_BT: torch.Tensor, n: int) -> torch.Tensor:
    """An encoder's mask of real tokens over n prepended positions: they are real."""
    return torch.cat((keep_BT.new_ones(keep_BT.shape[0], n), keep_BT), dim=1)


def drop_prefix(x_BTD: torch.Tensor, n: int) -> torch.Tensor:
    """The outputs at the input's own positions: the n prepended ones dropped."""
    return x_BTD[:, n:]


def loss_sum(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def _module(root: nn.Module, qualified: str) -> nn.Module:
    """The module at a dotted path under root, creating empty modules on the way."""
    m = root
    for part in qualified.split("."):
        if not hasattr(m, part):
            m.add_module(part, nn.Module())
        m = getattr(m, part)
    return m


def _add_param(root: nn.Module, p: ParamRecord, device) -> None:
    owner, _, leaf = fx_name(p.path).rpartition(".")
    t = torch.empty(p.shape, dtype=getattr(torch, p.dtype), device=device)
    _module(root, owner).register_parameter(leaf, nn.Parameter(t, requires_grad=p.trainable))


class Lowering:
    """What an adapter kind's lowering (`effc.compiler.adapters`) builds the graph with."""

    def __init__(self, ir: IR, g: fx.Graph, root: nn.Module, weight, tokens: fx.Node, device):
        self.ir, self.g, self.root, self._weight, self.tokens, self._device = ir, g, root, weight, tokens, device

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.g.call_function(fn, args, kwargs)

    def param(self, node: Node, i: int) -> fx.Node:
        """The node's i-th param (what a tied one reads)."""
        return self._weight(node, i)

    def linear(self, x: fx.Node, w: fx.Node, bias: fx.Node | None = None) -> fx.Node:
        return self.call(F.linear, x, w, *(() if bias is None else (bias,)))

    def dropout(self, node: Node, p: float, x: fx.Node) -> fx.Node:
        """Dropout owned by the node (a module, so train/eval mode switches it)."""
        _module(self.root, fx_name(node.id)).add_module("dropout", Dropout(p))
        return self.g.call_module(fx_name(node.id) + ".dropout", (x,))

    def constant(self, node: Node, name: str, t: torch.Tensor) -> fx.Node:
        """A tensor the kind derives from its attrs (column indices, a token map): a
        buffer of the node's module, never stored with the weights."""
        _module(self.root, fx_name(node.id)).register_buffer(name, t.to(self._device), persistent=False)
        return self.g.get_attr(f"{fx_name(node.id)}.{name}")


def embedding_adapters(ir: IR, id: str, values: list) -> list:
    """(node, value) of an embedding's adapters in declaration order, those that prepend
    positions (soft prompts) last: the others act on the tokens' own positions."""
    pairs = list(zip(adapters_of(ir, id), values))
    return sorted(pairs, key=lambda mv: kind_of(mv[0]).prefix(mv[0]) > 0)


def qat_weight(w_OI: torch.Tensor, step_OG: torch.Tensor, bits: int, group: int, updates: tuple) -> torch.Tensor:
    """QAT's weight: W plus each LoRA update s B A (L4Q, Jeon et al. 2024), fake-quantized
    with the learned steps (LSQ, effc.kernels.quant.fake_quant_lsq). `updates` holds
    (B, A, s) per adapter."""
    for B, A, s in updates:
        w_OI = w_OI + s * (B @ A)
    return Q.fake_quant_lsq(w_OI, step_OG, bits, group)


def inline(g: fx.Graph, fn, *args) -> fx.Node:
    """Append fn's operations to g, applied to fx nodes (and literals) `args`: the
    reference implementation written out op by op, as symbolic tracing would record it,
    so the kernel swaps (`effc.compiler.swaps`) find it with fn itself as the pattern."""
    tracer = fx.proxy.GraphAppendingTracer(g)
    out = fn(*(fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a for a in args))
    return out.node


def _quantized_linear(g: fx.Graph, n: Node, x: fx.Node, weight) -> fx.Node:
    """x @ dequant(W).T (+ bias), the reference: the scheme's dequantization
    (effc.kernels.quant) then F.linear, which the swap `quant_linear` replaces by the
    scheme's effc op. The packed tensors are the node's params in packed_params' order,
    then the bias."""
    a = n.attrs
    k = sum(p.quantized for p in n.params)
    packed = [weight(n, i) for i in range(k)]
    if a.quant == "int8":
        w = g.call_function(Q.dequantize_int8, tuple(packed))
    elif a.quant == "int4":
        w = g.call_function(Q.dequantize_int4, (*packed, a.group))
    else:
        absmax = g.call_function(Q.nf4_absmax, tuple(packed[1:])) if a.double_quant else packed[1]
        w = g.call_function(Q.dequantize_nf4, (packed[0], a.group, absmax))
    return g.call_function(F.linear, (x, w) + ((weight(n, k),) if a.bias else ()))


def graph_output(ir: IR) -> str:
    """The default output of an IR's graph: "loss" for a language model, "embedding" for
    an encoder."""
    return "embedding" if any(n.op is Op.POOL for n in ir.nodes()) else "loss"


def to_fx(ir: IR, seq: int, device: torch.device | str = "cpu", output: str | None = None,
          kernels=None) -> fx.GraphModule:
    """`output="loss"`: forward(tokens, targets) -> summed loss; `output="logits"`:
    forward(tokens) -> (B, T, vocab) logits, for evaluation metrics that compare models;
    `output="embedding"` (encoders): forward(tokens, keep) -> (B, dim). None: the IR's
    own (`graph_output`).

    The graph is lowered to the torch references of the hot ops, then the kernel swaps
    named in `kernels` (`effc.compiler.swaps.KERNELS`; None: all of them, () or "none":
    the reference graph) replace them by effc's ops; `gm.meta["swaps"]` lists those that
    fired. Every fx node lowered from an IR node carries its id in `node.meta["ir"]`."""
    natural = graph_output(ir)
    output = output or natural
    allowed = ("embedding",) if natural == "embedding" else ("loss", "logits")
    if output not in allowed:
        raise ValueError(f"to_fx: output must be one of {allowed} for this IR, not {output!r}")
    root = nn.Module()
    for p in ir.params():
        if p.tied_to is None:
            _add_param(root, p, device)
    g = fx.Graph()
    tokens = g.placeholder("tokens")
    targets = g.placeholder("targets") if output == "loss" else None
    keep_BT = keep = g.placeholder("keep") if output == "embedding" else None
    # Packed sequences (optional, (B, T) int64): the record of each position, which attention
    # keeps apart, and the position within its record, which rotary and learned positions use.
    segments = g.placeholder("segments", default_value=None) if output != "embedding" else None
    positions = g.placeholder("positions", default_value=None) if output != "embedding" else None
    # Soft prompts prepend `prefix` positions: the per-token inputs extend over them.
    prefix = prefix_length(ir)
    if prefix and segments is not None:  # placeholders, None at run time for unpacked rows
        segments = g.call_function(prefix_segments, (segments, prefix))
        positions = g.call_function(prefix_positions, (positions, prefix))
    if prefix and keep is not None:
        keep = g.call_function(prefix_keep, (keep, prefix))
    out: dict[str, fx.Node] = {}  # IR node id -> the fx node holding its output
    names: dict[str, str] = {}  # IR node id -> that fx node's name (calibration reads outputs by it)
    tables: dict[tuple, tuple[fx.Node, fx.Node]] = {}

    def weight(n, i: int = 0) -> fx.Node:
        p = n.params[i]
        return g.get_attr(fx_name(p.tied_to or p.path))

    def rope(a) -> tuple[fx.Node, fx.Node]:
        key = (a.head_dim, a.theta, a.scaling, a.factor, a.low_freq, a.high_freq, a.original_seq)
        if key not in tables:  # one (cos, sin) pair per distinct head width, base and scaling
            name = f"rotary{len(tables)}"
            cos, sin = rotary_tables(seq + prefix, *key)
            root.register_buffer(f"{name}_cos", cos.to(device), persistent=False)
            root.register_buffer(f"{name}_sin", sin.to(device), persistent=False)
            tables[key] = tuple(g.call_function(at_positions, (g.get_attr(f"{name}_{t}"), positions))
                                for t in ("cos", "sin")) if positions is not None else \
                (g.get_attr(f"{name}_cos"), g.get_attr(f"{name}_sin"))
        return tables[key]

    b = Lowering(ir, g, root, weight, tokens, device)
    for n in ir.nodes():
        last = next(reversed(g.nodes), None)
        x = [out[i] for i in ir.inputs(n.id)]
        a = n.attrs
        if n.op is Op.EMBEDDING:  # its inputs are its adapters' values
            y = g.call_function(F.embedding, (tokens, weight(n)))
            for m, v in embedding_adapters(ir, n.id, x):
                y = kind_of(m).after(b, m, v, y)
        elif n.op is Op.POSITION:
            if a.kind == "position":
                y = g.call_function(add_positions, (x[0], weight(n)) + ((positions,) if positions is not None else ()))
            else:
                y = g.call_function(add_type0, (x[0], weight(n)))
        elif n.op is Op.RMSNORM:
            y = inline(g, rms_norm_ref, x[0], weight(n), a.eps)
        elif n.op is Op.LAYERNORM:
            y = g.call_function(F.layer_norm, (x[0], (a.dim,), weight(n), weight(n, 1), a.eps))
        elif n.op is Op.LINEAR:
            adapters = [ir.node(i) for i in ir.inputs(n.id)[1:]]  # in declaration order
            h = x[0]
            for m, v in zip(adapters, x[1:]):
                h = kind_of(m).before(b, m, v, h)
            if a.quant == "qat":  # L4Q: the LoRA updates join the weight before it is fake-quantized
                w = g.call_function(qat_weight, (weight(n), weight(n, 1), a.bits, a.group,
                                                 tuple((weight(m, 1), weight(m, 0), m.attrs.scale) for m in adapters)))
                y = g.call_function(F.linear, (h, w) + ((weight(n, 2),) if a.bias else ()))
                adapters = []  # their own values (x-based) go unused: dead code, removed below
            else:
                y = _quantized_linear(g, n, h, weight) if a.quant else \
                    g.call_function(F.linear, (h, weight(n)) + ((weight(n, 1),) if a.bias else ()))
            for m, v in zip(adapters, x[1:]):
                y = kind_of(m).after(b, m, v, y)
        elif n.op in ADAPTERS:
            y = kind_of(n).lower(b, n, x[0] if x else None)
        elif n.op is Op.ROTARY:
            cos, sin = rope(a)
            y = g.call_function(rotary_ref, (x[0], cos, sin, a.heads))
        elif n.op is Op.ATTENTION_CORE:
            if keep is not None:  # an encoder: bidirectional, padded keys hidden
                y = g.call_function(attention, (x[0], x[1], x[2], a.heads, a.kv_heads, a.causal, keep))
            else:
                y = g.call_function(attention, (x[0], x[1], x[2], a.heads, a.kv_heads),
                                    {"causal": a.causal, "segments_BT": segments})
        elif n.op is Op.SWIGLU:
            y = inline(g, swiglu_ref, x[0], x[1])
        elif n.op is Op.GELU:
            y = g.call_function(F.gelu, (x[0],), {"approximate": a.approximate})
        elif n.op is Op.POOL:
            h = g.call_function(drop_prefix, (x[0], prefix)) if prefix else x[0]
            g.output(g.call_function(mean_pool, (h, keep_BT)))
            _stamp(g, last, n.id)
            break
        elif n.op is Op.RESIDUAL_ADD:
            y = g.call_function(operator.add, (x[0], x[1]))
        elif n.op is Op.LOSS:
            logits = g.call_function(drop_prefix, (x[0], prefix)) if prefix else x[0]
            if output == "logits":
                g.output(logits)
                _stamp(g, last, n.id)
                break
            y = g.call_function(loss_sum, (logits, targets))
        else:
            raise IRError(f"to_fx: no lowering for op {n.op.value} (node '{n.id}')")
        y.name = re.sub(r"\W", "_", fx_name(n.id))  # fx keeps names unique by suffixing
        out[n.id] = y
        names[n.id] = y.name
        _stamp(g, last, n.id)
    ends = [n for n in ir.nodes() if n.op in OUTPUTS]
    if len(ends) != 1 or ir.outputs(ends[0].id):
        raise IRError(f"to_fx: the IR must end in exactly one loss or pool node, found {len(ends)}")
    if output == "loss":
        g.output(out[ends[0].id])
    g.lint()
    gm = fx.GraphModule(root, g, class_name="EffcGraph")
    if any(n.op is Op.LINEAR and n.attrs.quant == "qat" and len(ir.inputs(n.id)) > 1 for n in ir.nodes()):
        gm.graph.eliminate_dead_code()  # the LoRA values L4Q folded into weights instead
        gm.recompile()
    gm.meta["ir_nodes"] = names
    from effc.compiler.swaps import swap  # swaps imports this module's helpers

    gm.meta["swaps"] = swap(gm, kernels)
    return gm


def _stamp(g: fx.Graph, last: fx.Node | None, ir_id: str) -> None:
    """Mark the nodes appended after `last` (None: all) as lowered from IR node ir_id,
    walking back from the end: only the new nodes are visited."""
    for node in reversed(g.nodes):
        if node is last:
            break
        node.meta.setdefault("ir", ir_id)
