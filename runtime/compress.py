"""The compression statements at run time: `share`, `prune` and `quantize` rewrite a state.

The compiler has already rewritten the IR (`effc.compiler.passes.compress`): these
functions produce the state that matches the IR after the statement, from the state
before it, and say what they did in one line.

- share (Bae et al. 2024): block k of a recursive share starts as the mean of the layers
  that will use it (init=average: layers k, k+K, ...), as layer k*N/K (stepwise), or as
  layer k (lower). The looped layers' own params leave the state (they are tied to their
  blocks'); each original linear weight minus its block's is handed to the per-loop
  adapters, whose LoRA starts from its truncated SVD (`effc.compiler.adapters.lora`).
- prune: the weights' masks are computed (magnitude, N:M, Wanda) and applied; the zeros
  stay through later training (`effc.runtime.train`) and merges.
- quantize: each selected weight is replaced by its packed tensors (effc.kernels.quant):
  round-to-nearest int8, int4 or NF4, or GPTQ's int4.

Calibration (Wanda, GPTQ) runs the model as it is before the statement over `samples`
sequences of the calibration data and reads each target's input there (the output of
the IR node feeding it): the L2 norm of every input feature (Wanda) and the Hessian
2/n·Σ x xᵀ in float64 (GPTQ). All targets are calibrated in one pass over the dense
model, not layer by layer over the partly quantized one as the GPTQ paper does: a
simpler, slightly weaker variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from effc.compiler.ir import IR
from effc.compiler.to_fx import graph_output
from effc.kernels import quant as Q
from effc.runtime import data as D
from effc.runtime import prune as P

State = dict[str, torch.Tensor]


# ---------------------------------------------------------------- calibration


@dataclass
class InputStats:
    """What calibration learns about one linear input (width `d`)."""

    tokens: int = 0
    sumsq: torch.Tensor | None = None  # (d,) float64: Σ x_j²
    hessian: torch.Tensor | None = None  # (d, d) float64: Σ x xᵀ (GPTQ scales it by 2/n)

    @property
    def norms(self) -> torch.Tensor:
        return self.sumsq.sqrt().float()

    def gptq_hessian(self) -> torch.Tensor:
        return (2.0 / max(self.tokens, 1)) * self.hessian


class _Streams(fx.Interpreter):
    """Runs a graph and scores each watched sublayer: its residual add's output against
    the stream it added to (runtime.prune.SublayerSimilarity)."""

    def __init__(self, gm: fx.GraphModule, pairs: dict[str, tuple[str, "P.SublayerSimilarity"]]):
        super().__init__(gm)
        self.pairs, self.seen = pairs, {}
        self.inputs = {src for src, _ in pairs.values()}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.inputs:
            self.seen[n.name] = out
        if n.name in self.pairs:
            src, sim = self.pairs[n.name]
            sim.update(self.seen[src], out)
        return out


def _windows(gm: fx.GraphModule, ir: IR, runner: fx.Interpreter, split: D.Split, seq: int, samples: int,
             batch: int) -> None:
    """Run `runner` over the first `samples` windows of `split` (a sentence encoder reads
    them as sentences, every token real)."""
    encoder = graph_output(ir) == "embedding"
    was = gm.training
    gm.eval()
    with torch.no_grad():
        for ids in D.eval_windows(split, seq, batch, samples):
            x, y = D.gather(split, seq, ids)
            if encoder:
                runner.run(x, torch.ones_like(x, dtype=torch.bool))
            else:
                runner.run(x, y, *(D.packing(split, seq, ids) or (None, None)))
    gm.train(was)


def sublayer_similarity(gm: fx.GraphModule, ir: IR, layers: list[str], kind: str, split: D.Split, seq: int,
                        samples: int, batch: int = 8) -> dict[str, float]:
    """Layer path -> mean cos(x_in, x_out) of its `kind` sublayer over the calibration windows."""
    names = gm.meta["ir_nodes"]
    sims = {layer: P.SublayerSimilarity() for layer in layers}
    pairs = {names[f"{layer}.{kind}_residual"]: (names[ir.inputs(f"{layer}.{kind}_residual")[0]], sims[layer])
             for layer in layers}
    _windows(gm, ir, _Streams(gm, pairs), split, seq, samples, batch)
    return {layer: s.result() for layer, s in sims.items()}


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[str, InputStats], hessian: bool):
        super().__init__(gm)
        self.watch, self.hessian = watch, hessian

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        stats = self.watch.get(n.name)
        if stats is not None:
            x = out.detach().reshape(-1, out.shape[-1]).double()  # (tokens, d)
            stats.tokens += x.shape[0]
            sq = (x * x).sum(0)
            stats.sumsq = sq if stats.sumsq is None else stats.sumsq + sq
            if self.hessian:
                h = x.T @ x
                stats.hessian = h if stats.hessian is None else stats.hessian + h
        return out


def calibrate(gm: fx.GraphModule, ir: IR, targets: list[str], split: D.Split, seq: int, samples: int,
              hessian: bool, batch: int = 8) -> dict[str, InputStats]:
    """Input statistics of each target linear (by id) over the first `samples`
    sequences of `split`; targets that read the same node share one record."""
    names = gm.meta["ir_nodes"]
    by_input: dict[str, InputStats] = {}
    for t in targets:
        by_input.setdefault(names[ir.inputs(t)[0]], InputStats())
    _windows(gm, ir, _Capture(gm, by_input, hessian), split, seq, samples, batch)
    return {t: by_input[names[ir.inputs(t)[0]]] for t in targets}


# ---------------------------------------------------------------- the statements


@dataclass
class Outcome:
    state: State
    line: str
    record: dict = field(default_factory=dict)  # what metrics.jsonl gets
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # share: per-loop LoRA inits


def _weight_path(ir: IR, target: str) -> str:
    w = ir.node(target).params[0]
    return w.tied_to or w.path


def share(edit, state: State) -> Outcome:
    first = int(re.fullmatch(r"layers\[(\d+)\]", edit.paths[0]).group(1))
    n, k, init = len(edit.paths), edit.args["blocks"], edit.args["init"]
    loops = n // k
    out = dict(state)
    residuals: dict[str, torch.Tensor] = {}

    def params_of(layer: int) -> dict[str, torch.Tensor]:
        prefix = f"layers[{layer}]."
        return {p[len(prefix):]: t for p, t in state.items() if p.startswith(prefix)}

    for b in range(k):
        users = [first + b + j * k for j in range(loops)]  # the layers that run block b
        source = {"average": users, "stepwise": [first + b * loops], "lower": [first + b]}[init]
        members = [params_of(i) for i in source]
        block = {leaf: (torch.stack([m[leaf] for m in members]).mean(0) if t.is_floating_point() else t)
                 for leaf, t in members[0].items()}
        for i in users:
            own = params_of(i)
            for leaf, t in own.items():
                if leaf.endswith(".weight") and t.dim() == 2:  # a linear: what per-loop LoRA starts from
                    residuals[f"layers[{i}].{leaf[:-len('.weight')]}"] = t - block[leaf]
                del out[f"layers[{i}].{leaf}"]
        for leaf, t in block.items():
            out[f"layers[{first + b}].{leaf}"] = t.clone()
    line = (f"  shared layers {first}..{first + n - 1} as {k} blocks looped {loops} times (init={init}): "
            f"{sum(t.numel() for t in state.values()) - sum(t.numel() for t in out.values()):,} params fewer")
    return Outcome(out, line, {"layers": n, "blocks": k, "init": init}, residuals)


def tie(edit, state: State) -> Outcome:
    """`tie A with B`: A's params leave the state; from now on A reads B's."""
    gone = tuple(f"{p}." for p in edit.paths)
    out = {p: t for p, t in state.items() if not p.startswith(gone)}
    pairs = ", ".join(f"{a} -> {b}" for a, b in zip(edit.paths, edit.args["source"]))
    line = f"  tied {pairs}: {sum(t.numel() for t in state.values()) - sum(t.numel() for t in out.values()):,} params fewer"
    return Outcome(out, line, {"tied": list(edit.paths), "to": list(edit.args["source"])})


def prune_structure(edit, ir: IR, state: State) -> Outcome:
    """heads / channels: per selected attention (MLP), the lowest-scoring kv groups
    (channels) by weight magnitude (runtime.prune.head_scores, channel_scores) leave its
    tensors."""
    out = dict(state)
    before = after = 0
    for p in [p for p in edit.paths if f"{p}.core" in ir or f"{p}.down" in ir]:  # not a dropped sublayer
        leaves = {k[len(p) + 1:]: t for k, t in state.items() if k.startswith(p + ".")}
        if edit.technique == "heads":
            a = ir.node(f"{p}.core").attrs
            scores = P.head_scores(*(leaves[f"{n}.weight"] for n in "qkvo"), a.heads, a.kv_heads, a.head_dim)
            keep = P.choose_keep(scores, round(edit.args["fraction"] * a.kv_heads))
            kept = P.prune_heads(leaves, a.heads, a.kv_heads, a.head_dim, keep)
        else:
            scores = P.channel_scores(leaves)
            keep = P.choose_keep(scores, round(edit.args["fraction"] * len(scores)))
            kept = P.prune_channels(leaves, keep)
        before += len(scores)
        after += len(keep)
        out.update({f"{p}.{leaf}": t for leaf, t in kept.items()})
    what = "key/value head groups" if edit.technique == "heads" else "channels"
    removed = sum(t.numel() for t in state.values()) - sum(t.numel() for t in out.values())
    line = f"  pruned {edit.technique}: kept {after} of {before} {what} ({removed:,} params fewer)"
    return Outcome(out, line, {"kept": after, "of": before, "params_removed": removed})


def drop_sublayers(edit, state: State, similarity: dict[str, float]) -> Outcome:
    """The `count` sublayers whose output is most similar to their input go (He et al.
    2024): their params leave the state, and the choice is recorded in the statement's
    args (`dropped`), which the IR passes read from then on."""
    k = edit.args["kind"]
    chosen = set(P.choose_drop(similarity, edit.args["count"]))
    edit.args["dropped"] = [p for p in edit.paths if p in chosen]  # in layer order
    gone = tuple(f"{layer}.{k}{sep}" for layer in chosen for sep in (".", "_norm."))
    out = {p: t for p, t in state.items() if not p.startswith(gone)}
    scores = ", ".join(f"{p} {similarity[p]:.3f}" for p in edit.args["dropped"])
    line = (f"  dropped the {k} sublayer of {len(chosen)} layers (input/output cosine {scores}): "
            f"{sum(t.numel() for t in state.values()) - sum(t.numel() for t in out.values()):,} params fewer")
    return Outcome(out, line, {"dropped": edit.args["dropped"], "similarity": similarity})


def prune(edit, ir: IR, state: State, stats: dict[str, InputStats] | None) -> Outcome:
    if edit.technique in ("heads", "channels"):
        return prune_structure(edit, ir, state)
    a, out = edit.args, dict(state)
    paths = list(dict.fromkeys(_weight_path(ir, t) for t in edit.paths if t in ir))  # a shared weight once
    weights = {p: state[p] for p in paths}
    if edit.technique == "magnitude":
        masks = P.magnitude_masks(weights, a["sparsity"], a["scope"])
    elif edit.technique == "nm":
        masks = {p: P.nm_mask(w.abs(), a["n"], a["m"]) for p, w in weights.items()}
    else:  # wanda: a shared weight is scored with its first use's inputs
        norm = {_weight_path(ir, t): stats[t].norms for t in reversed(edit.paths) if t in ir}
        masks = {p: (P.wanda_nm_mask(w, norm[p], a["n"], a["m"]) if a["n"] is not None
                     else P.wanda_mask(w, norm[p], a["sparsity"])) for p, w in weights.items()}
    zeros = total = 0
    for p, m in masks.items():
        out[p] = state[p] * m
        zeros += int((out[p] == 0).sum())
        total += m.numel()
    line = f"  pruned {len(masks)} weights with {edit.technique}: {zeros / total:.1%} of {total:,} weights are zero"
    return Outcome(out, line, {"weights": len(masks), "sparsity": zeros / total})


def _qat(edit, ir: IR, state: State) -> Outcome:
    """qat: each weight stays and gains LSQ's initial step per (row, group); training then
    learns both (effc.compiler.to_fx.qat_weight)."""
    a, out, err, ref = edit.args, dict(state), 0.0, 0.0
    paths = list(dict.fromkeys(_weight_path(ir, t) for t in edit.paths if t in ir))
    for path in paths:
        w = state[path].float()
        step = Q.lsq_init_step(w, a["bits"], a["group"])
        out[path.rsplit(".", 1)[0] + ".step"] = step
        err += float((Q.fake_quant_lsq(w, step, a["bits"], a["group"]) - w).double().pow(2).sum())
        ref += float(w.double().pow(2).sum())
    rel = (err / ref) ** 0.5 if ref else 0.0
    line = (f"  quantization-aware: {len(paths)} weights fake-quantized to {a['bits']} bits (group={a['group']}), "
            f"relative weight error at the initial steps {rel:.4f}")
    return Outcome(out, line, {"weights": len(paths), "scheme": f"qat(bits={a['bits']}, group={a['group']})",
                               "relative_error": rel})


def quantize(edit, ir: IR, state: State, stats: dict[str, InputStats] | None) -> Outcome:
    a, out = edit.args, dict(state)
    done: set[str] = set()
    err = ref = 0.0
    if edit.technique == "qat":
        return _qat(edit, ir, state)
    for t in [t for t in edit.paths if t in ir]:  # a dropped sublayer's weights are gone
        path = _weight_path(ir, t)
        if path in done:
            continue  # a shared weight is quantized once, at its block
        done.add(path)
        w = state[path].float()
        if edit.technique == "int8":
            packed = Q.quantize_int8(w)
            deq = Q.dequantize_int8(packed["qweight"], packed["scale"])
        elif edit.technique == "int4":
            packed = (Q.gptq_int4(w, stats[t].gptq_hessian(), a["group"]) if a["method"] == "gptq"
                      else Q.quantize_int4_rtn(w, a["group"]))
            deq = Q.dequantize_int4(packed["qweight"], packed["scale"], packed["zero"], a["group"])
        else:
            packed = Q.quantize_nf4(w, a["group"], a["double_quant"])
            deq = Q.dequantize_nf4(group=a["group"], **packed)
        err += float((deq - w).double().pow(2).sum())
        ref += float(w.double().pow(2).sum())
        owner = path.rsplit(".", 1)[0]
        del out[path]
        out.update({f"{owner}.{leaf}": v for leaf, v in packed.items()})
    scheme = edit.technique + (f"(group={a['group']}" + (", gptq" if a.get("method") == "gptq" else "") + ")"
                               if "group" in a else "")
    rel = (err / ref) ** 0.5 if ref else 0.0
    line = f"  quantized {len(done)} weights to {scheme}: relative weight error {rel:.4f}"
    return Outcome(out, line, {"weights": len(done), "scheme": scheme, "relative_error": rel})
