"""Models as the runtime holds them: a state (canonical path -> tensor) and the fx graph
that computes with it.

A model's state is a plain dict keyed by the IR's canonical param paths
(`layers[0].attn.q.weight`); it is what stages hand each other, what snapshots keep and
what checkpoints and exports store. `materialize` builds the IR's fx graph on the CPU
and fills it from a state; params the state lacks (a fresh model, or an adapter added
in this stage) are initialised from the seed and the param's path alone, so adding an
adapter never changes how anything else is initialised.

Initialisation (Llama/GPT-2 practice): embeddings and linear weights N(0, 0.02), the
output projections of attention and MLP (`attn.o`, `mlp.down`) N(0, 0.02/sqrt(2 layers))
so the residual stream does not grow with depth (Radford et al. 2019), learned position
and token-type tables N(0, 0.02), norm weights 1, biases 0.
Adapters are initialised by their kind (`effc.compiler.adapters`; LoRA, Hu et al. 2021:
B = 0 so training starts from the base model; A with init=kaiming is uniform(+-1/sqrt(in)),
torch's default for a linear layer of that width, and with init=gaussian N(0, 1/rank)).
A generated param (storage "generated", NOLA's bases) is never part of a state: every
graph makes it again from its kind's own seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import torch
import torch.fx as fx

from effc.compiler.adapters import kind_of
from effc.compiler.ir import ADAPTERS, IR, NORMS, Op, ParamRecord, packed_params
from effc.compiler.to_fx import fx_name, to_fx
from effc.kernels import quant as Q

State = dict[str, torch.Tensor]


def param_seed(seed: int, path: str) -> int:
    """A 63-bit seed for one param: independent of every other param and of their order."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _init(p: ParamRecord, node, layers: int, seed: int, args: dict, base: dict) -> torch.Tensor:
    """A fresh param; `args` and `base` (the target's params by leaf) are for adapters."""
    g = torch.Generator().manual_seed(param_seed(seed, p.path))
    t = torch.empty(p.shape, dtype=getattr(torch, p.dtype))
    leaf = p.path.rsplit(".", 1)[-1]
    if node.op in ADAPTERS:
        return kind_of(node).init(node, leaf, t, g, args, base)
    if node.op in NORMS:
        return t.fill_(1.0) if leaf == "weight" else t.zero_()
    if leaf == "bias":
        return t.zero_()
    std = 0.02
    if node.id.endswith((".attn.o", ".mlp.down")):
        std /= math.sqrt(2 * max(layers, 1))
    return t.normal_(0.0, std, generator=g)


def materialize(ir: IR, seq: int, state: State, seed: int, adapter_args: dict | None = None,
                output: str | None = None, kernels=None) -> tuple[fx.GraphModule, list[str]]:
    """The fx graph of `ir` with its params taken from `state` or initialised.

    Returns the graph module and the paths it initialised. `adapter_args` maps an
    adapter node id to its technique's arguments (LoRA's `init` choice, default kaiming).
    Adapters are filled after every base param, since some start from their target's
    weight (DoRA's magnitude is its row norms). `kernels`: the kernel swaps (to_fx's;
    None: all)."""
    gm = to_fx(ir, seq, "cpu", output, kernels)
    layers = sum(1 for n in ir.nodes() if n.op is Op.RESIDUAL_ADD) // 2
    fresh = []
    nodes = ir.nodes()

    def param(p: ParamRecord) -> torch.nn.Parameter:
        return gm.get_parameter(fx_name(p.tied_to or p.path))

    with torch.no_grad():
        for n in [n for n in nodes if n.op not in ADAPTERS] + [n for n in nodes if n.op in ADAPTERS]:
            base = ({q.path.rsplit(".", 1)[-1]: param(q) for q in ir.node(n.attrs.target).params}
                    if n.op in ADAPTERS else {})
            for p in n.params:
                if p.tied_to is not None:
                    continue
                target = param(p)
                if p.storage == "generated":
                    target.copy_(_init(p, n, layers, seed, (adapter_args or {}).get(n.id, {}), base))
                elif p.path in state:
                    src = state[p.path]
                    if tuple(src.shape) != p.shape:
                        raise ValueError(f"state has {p.path} of shape {tuple(src.shape)}, the IR says {p.shape}")
                    target.copy_(src)
                else:
                    target.copy_(_init(p, n, layers, seed, (adapter_args or {}).get(n.id, {}), base))
                    fresh.append(p.path)
    return gm, fresh


def device_of(m: torch.nn.Module) -> torch.device:
    """Where a module's params live (the CPU for a module without any)."""
    return next((p.device for p in m.parameters()), torch.device("cpu"))


def state_of(gm: fx.GraphModule, ir: IR) -> State:
    """The params of a graph module by canonical path: detached copies in host memory
    (a model trained on a GPU comes back to the CPU), tied ones once, generated ones never."""
    return {p.path: gm.get_parameter(fx_name(p.path)).detach().to("cpu", copy=True)
            for p in ir.params() if p.tied_to is None and p.storage != "generated"}


def trainable(gm: fx.GraphModule, ir: IR) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical path, param) of every trainable param, in IR order."""
    return [(p.path, gm.get_parameter(fx_name(p.path))) for p in ir.params()
            if p.tied_to is None and p.trainable]


def merged_state(ir: IR, state: State, dropped: dict[str, float] | None = None) -> State:
    """Adapters folded into their base weights in declaration order (LoRA: W + (alpha/rank)
    B A; each kind's `merge`); the result has the base model's params only. Raises
    CannotMerge for a kind whose update has no exact fold. A weight the merge leaves as
    it was (the same object) keeps its place, so a tied one stays tied. A pruned weight
    (storage sparse) keeps its zeros: the merged update is masked, and `dropped` gets the
    fraction of the update's norm the mask removed, per weight."""
    out = {k: v.clone() for k, v in state.items()}
    masks = {p.path: out[p.path] != 0 for p in ir.params() if p.storage.startswith("sparse") and p.path in out}
    adapter = [n for n in ir.nodes() if n.op in ADAPTERS]
    held = {p.path: out[p.path] for n in adapter for p in n.params if p.path in out}
    for n in adapter:
        params = {p.path.rsplit(".", 1)[-1]: held[p.tied_to or p.path] for p in n.params if p.storage != "generated"}
        target = ir.node(n.attrs.target)
        w_rec = target.params[0]
        b_rec = target.params[1] if len(target.params) > 1 else None
        w = out.get(w_rec.path)
        if w is None:  # a tied weight with its own update is no longer tied
            w = out[w_rec.tied_to]
        bias = out.get(b_rec.path) if b_rec else None
        merged, bias = kind_of(n).merge(n, params, w, bias)
        if merged is not w and w_rec.path in masks:
            update = (merged - w).double()
            kept = update * masks[w_rec.path]
            if dropped is not None:
                total = float(update.norm())
                dropped[w_rec.path] = float((update - kept).norm()) / total if total else 0.0
            merged = w + kept.to(w.dtype)
        if merged is not w:
            out[w_rec.path] = merged
        if b_rec:
            out[b_rec.path] = bias
    for path in held:
        del out[path]
    return out


def dense_ir(ir: IR) -> IR:
    """The IR with every compressed storage undone: quantized linears hold a dense fp32
    weight again and the loops of shared blocks (and their shared adapters) their own
    params, so a format without packed or shared tensors (hf) can hold the model."""
    updated = []
    for n in ir.nodes():
        params = n.params
        if n.op is Op.LINEAR and n.attrs.quant and n.attrs.quant != "qat":  # QAT keeps its dense weight
            a = n.attrs
            role = n.params[0].role
            params = (ParamRecord(f"{n.id}.weight", (a.out_features, a.in_features), role, trainable=False),) + \
                n.params[len(packed_params(n.id, a.out_features, a.in_features, a.quant, a.group, a.double_quant, role)):]
            n = replace(n, attrs=replace(a, quant="", group=0, double_quant=False))
        params = tuple(replace(p, tied_to=None, storage="dense") if p.storage == "shared" else p for p in params)
        updated.append(replace(n, params=params))
    return ir.with_nodes(updated)


def dense_state(ir: IR, state: State) -> State:
    """`state` (of `ir`) for `dense_ir(ir)`: packed weights dequantized to fp32, and every
    loop of a shared block given a copy of its block's tensors."""
    out = dict(state)
    for n in ir.nodes():
        if n.op is Op.LINEAR and n.attrs.quant and n.attrs.quant != "qat":
            w = n.params[0]
            owner = (w.tied_to or w.path).rsplit(".", 1)[0]
            packed = {p.path.rsplit(".", 1)[-1]: state[f"{owner}.{p.path.rsplit('.', 1)[-1]}"]
                      for p in n.params if p.quantized}
            out[f"{n.id}.weight"] = Q.dequantize(n.attrs.quant, packed, n.attrs.group)
        for p in n.params:
            if p.storage == "shared" and not p.quantized:
                out[p.path] = state[p.tied_to].clone()
    for n in ir.nodes():  # the packed tensors are gone once every user is dequantized
        for p in n.params:
            if p.quantized:
                out.pop(p.path, None)
    return out


def realize_qat(ir: IR, state: State) -> State:
    """A state whose QAT weights hold their fake-quantized values and no step: what a
    format without fake quantization (hf) stores (adapters already merged into them)."""
    out = dict(state)
    for n in ir.nodes():
        if n.op is Op.LINEAR and n.attrs.quant == "qat" and f"{n.id}.step" in out:
            with torch.no_grad():
                out[f"{n.id}.weight"] = Q.fake_quant_lsq(out[f"{n.id}.weight"].float(), out.pop(f"{n.id}.step"),
                                                         n.attrs.bits, n.attrs.group)
    return out
