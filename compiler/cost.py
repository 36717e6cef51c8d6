"""Cost: parameters, bytes and FLOPs of a training step, read from the IR alone.

Nothing is allocated: every number comes from param records and symbolic shapes, so a
70B-parameter declaration costs as fast as a tiny one.

Parameters: a tied param (`tied_to`) is storage shared with another and counted once.
A generated param (storage "generated": NOLA's random bases, made again from a seed and
never stored) is not a parameter of the model, but it is held in memory: its bytes are
in the weights.

Soft prompts prepend positions to every sequence (`AdapterKind.prefix`): everything per
token below is counted over seq + prefix positions, except the loss's log-probabilities,
which cover the input's own positions.

Bytes (B = batch, T = seq, fp32 = 4 bytes unless a record says otherwise):
- weights: every stored param; gradients: trainable params only;
- optimizer: AdamW keeps two fp32 moments per trainable element;
- activations saved for backward, per token. Only nodes whose output requires a gradient
  (a trainable param at or upstream of them, as autograd decides) save anything, and a
  tensor saved by several consumers (the norm output read by q, k, v) is counted once:
  - EMBEDDING: the token ids (int64) when its weight is trainable;
  - RMSNORM: its input x (dim) and the reciprocal rms (1 element); LAYERNORM: its input
    and the mean and reciprocal standard deviation (2 elements);
  - POSITION (learned positions and token types): nothing (the table's gradient is the
    output gradient, gathered by position); GELU: its input (ffn);
  - LINEAR: its input (in_features) when its weight is trainable (the input gradient
    needs only W);
  - an adapter node: what its kind says (`AdapterKind.saved`, plus `saved_per_step`
    once a step for matrices it assembles, documented in each kind's
    module; LoRA: its input, with dropout the dropped copy plus a 1-byte mask when the
    input needs a gradient, and the rank-r intermediate A x);
  - ROTARY: nothing (backward rotates by -theta using the constant tables);
  - ATTENTION_CORE: q, k, v, its output and a logsumexp per head, as a fused
    (flash-style) kernel does: no T x T matrix is kept. With grouped-query attention
    k and v are saved as their per-query-head copies (heads * head_dim each);
  - SWIGLU: gate and up (ffn each); RESIDUAL_ADD: nothing;
  - LOSS: the log-probabilities (vocab);
- transient: the largest set of temporaries one op's backward holds beside the saved
  activations: the loss, the gradients of the log-probabilities and of the logits
  (2 * vocab per token); SwiGLU, its output gradient, a sigmoid and its two input
  gradients (4 * ffn); any other op, its output and input gradients;
  RMSNorm, its output gradient, that times w, x * rstd and their product (4 * dim);
- forward: at each op, what was saved so far, every output still waiting for a consumer
  (the residual stream, q/k/v before attention), the op's output and its temporaries
  (repeated k and v and a logsumexp in attention; one more output-sized tensor in
  SwiGLU, RMSNorm and a linear with adapters; an adapter's, as its kind says); the worst op counts;
- the fused head + loss (the kernel swap `linear_cross_entropy`, when the plan's
  `kernels` name it and the head has no adapter or prompt in the way): the head saves
  nothing and the loss saves the input gradient it computed in forward (dim, when the
  head's input needs one) and, with a trainable head, its weight's gradient (once a
  step); the (tokens, vocab) logits never exist, in forward or backward;
- activation checkpointing (an execution plan's `checkpoint`, one choice per layer): the
  nodes of a recomputed piece -- a whole layer, or its attention or MLP sublayer, as
  effc.runtime.planned splits the graph -- save nothing, and the piece saves its inputs
  instead (the activations entering it: the residual stream); its backward recomputes
  its own saves, so the largest piece's are added to the transient;
- peak = weights + optimizer + max(gradients + activations + transient, forward).
  Gradients fill up while activations are freed, so the backward term is an upper
  bound: measured against a tensor-level tracker (tests/runtime/test_memory.py) it is
  within a few percent for adapter training and up to ~25% high for full training.

FLOPs per token, with N = elements of the weights of matmul ops (LINEAR and the low-rank
adapters, whose kinds count the same way; other kinds count their own; a tied
head's matrix counts, since it is multiplied even though it is stored once) and the
PaLM convention for attention (Chowdhery et al. 2022, appendix B; no causal halving):
- forward = 2 N + 4 T d_attn per layer, d_attn = heads * head_dim (QK^T and PV);
- backward: for each matmul whose input requires a gradient, 2 * weight elements (the
  input gradient), plus 2 * weight elements for each trainable weight (the weight
  gradient); each attention core that requires a gradient costs 8 T d_attn. With
  everything trainable this is 2x forward; with a frozen base, the layers before the first
  adapter cost nothing and the frozen matmuls cost only their input gradients;
- a training step = forward + backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from effc.compiler.adapters import kind_of, prefix_length
from effc.compiler.ir import ADAPTERS, IR, NORMS, Node, Op, ParamRecord
from effc.compiler.plan import piece

# int64: embedding_rows' stored row index; uint8/int8: packed quantized weights
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "uint8": 1, "int8": 1}
OPTIMIZER_STATES = {"adamw": 2}  # fp32 moments per trainable element
ID_BYTES = 8  # int64 token ids


@dataclass(frozen=True)
class Cost:
    batch: int
    seq: int
    params_total: int
    params_trainable: int
    params_by_role: tuple[tuple[str, int], ...]
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    transient_bytes: int
    peak_bytes: int
    flops_forward_per_token: int
    flops_train_per_token: int
    # (what, text) lines about compressed storage: quantized, sparse and shared weights
    storage: tuple[tuple[str, str], ...] = ()


def _width(n: Node) -> int:
    """Elements per token of a node's output (0 for a scalar)."""
    return n.shape[-1] if n.shape else 0


def _stored(ir: IR) -> list[ParamRecord]:
    return [p for p in ir.params() if p.tied_to is None]


def _requires_grad(ir: IR) -> dict[str, bool]:
    rg: dict[str, bool] = {}
    for n in ir.nodes():
        rg[n.id] = any(p.trainable for p in n.params) or any(rg[s] for s in ir.inputs(n.id))
    return rg


def _saved(ir: IR, rg: dict[str, bool]) -> list[tuple[str, set[str], int]]:
    """Per node in topological order: (id, ids of the tensors it saves that others may
    save too, bytes of tensors private to it); see the module docstring for each op."""
    out = []
    for n in ir.nodes():
        shared: set[str] = set()
        extra = 0
        ins = ir.inputs(n.id)
        trainable = any(p.trainable for p in n.params)
        if not rg[n.id]:
            pass
        elif n.op is Op.EMBEDDING and trainable:
            extra += ID_BYTES
        elif n.op is Op.RMSNORM:
            shared.add(ins[0])
            extra += 4
        elif n.op is Op.LAYERNORM:
            shared.add(ins[0])
            extra += 8  # mean and reciprocal standard deviation
        elif n.op is Op.GELU:
            shared.add(ins[0])
        elif n.op is Op.LINEAR and trainable:
            shared.add(ins[0])
        elif n.op in ADAPTERS:
            shared, extra = kind_of(n).saved(ir, n, rg)
        elif n.op is Op.ATTENTION_CORE:
            a = n.attrs
            shared.update([ins[0], n.id])
            if a.kv_heads == a.heads:
                shared.update(ins[1:])
            else:  # k and v are saved as their per-query-head copies
                extra += 2 * a.heads * a.head_dim * 4
            extra += a.heads * 4
        elif n.op is Op.SWIGLU:
            shared.update(ins)
        elif n.op is Op.LOSS:
            extra += _width(ir.node(ins[0])) * 4  # the log-probabilities
        out.append((n.id, shared, extra))
    return out


def _forward_temporaries(ir: IR, n: Node) -> int:
    """Floats per token an op allocates in forward besides its output."""
    if n.op is Op.ATTENTION_CORE:
        a = n.attrs
        copies = 2 * a.heads * a.head_dim if a.kv_heads != a.heads else 0  # repeated k and v
        return copies + a.heads  # and the logsumexp
    if n.op in ADAPTERS:
        return kind_of(n).forward_temporaries(ir, n)
    if n.op in (Op.SWIGLU, Op.RMSNORM) or (n.op is Op.LINEAR and len(ir.inputs(n.id)) > 1):
        return _width(n)  # silu(gate); x * rstd; x W^T before adding adapters
    return 0


def fused_head(ir: IR) -> tuple[str, str] | None:
    """(head, loss) ids when the kernel swap `linear_cross_entropy` fuses them: the loss
    reads a linear that has no adapters, and no soft prompt's positions are dropped in
    between (effc.compiler.swaps)."""
    loss = next((n for n in ir.nodes() if n.op is Op.LOSS), None)
    if loss is None or prefix_length(ir):
        return None
    head = ir.node(ir.inputs(loss.id)[0])
    return (head.id, loss.id) if head.op is Op.LINEAR and len(ir.inputs(head.id)) == 1 else None


def _forward_peak_per_token(ir: IR, rg: dict[str, bool], saved: list, fused: tuple[str, str] | None) -> int:
    """Bytes per token live at the worst moment of forward: what was saved so far, every
    output still waiting for a consumer (the residual stream), and the op's own output
    and temporaries. With the head and loss `fused`, the logits never exist: the head has
    no output, and the loss holds one chunk of logits (min(vocab, dim) floats a token at
    the default chunk) and the input gradient (dim) it computes in forward."""
    nodes = ir.nodes()
    index = {n.id: i for i, n in enumerate(nodes)}
    last_use = {n.id: max((index[c] for c in ir.outputs(n.id)), default=index[n.id]) for n in nodes}
    saved_ids: set[str] = set()
    extra, worst = 0, 0
    for i, ((id, shared, e), n) in enumerate(zip(saved, nodes)):
        saved_ids |= shared
        extra += e
        live = {m.id for m in nodes[: i + 1] if last_use[m.id] >= i} | saved_ids
        if fused:
            live.discard(fused[0])
        temporaries = _forward_temporaries(ir, n)
        if fused and n.id == fused[1]:
            d, v = _width(ir.node(ir.inputs(fused[0])[0])), _width(ir.node(fused[0]))
            temporaries = min(v, d) + d
        worst = max(worst, extra + 4 * (sum(_width(ir.node(j)) for j in live) + temporaries))
    return worst


def _transient_per_token(ir: IR, rg: dict[str, bool], fused: tuple[str, str] | None = None) -> int:
    """Bytes per token of the largest set of temporaries one op's backward holds beside
    the saved activations (see the module docstring)."""
    worst = 0
    for n in ir.nodes():
        if not rg[n.id]:
            continue
        if fused and n.id == fused[1]:  # the saved input gradient scaled, and its sum into the input's
            t = 2 * _width(ir.node(ir.inputs(fused[0])[0]))
        elif n.op is Op.LOSS:
            t = 2 * _width(ir.node(ir.inputs(n.id)[0]))  # grads of the log-probs and the logits
        elif n.op is Op.SWIGLU:
            t = 4 * _width(n)  # output grad, sigmoid, and the two input grads
        elif n.op in NORMS:
            t = 4 * _width(n)  # output grad, its product with w, x * rstd, and their product
        else:
            t = _width(n) + sum(_width(ir.node(i)) for i in ir.inputs(n.id))  # output and input grads
        worst = max(worst, t)
    return 4 * worst


def _flops(ir: IR, rg: dict[str, bool], seq: int) -> tuple[int, int]:
    fwd = bwd = 0
    for n in ir.nodes():
        if n.op in ADAPTERS:
            f, b = kind_of(n).flops(ir, n, rg)
            fwd, bwd = fwd + f, bwd + b
        elif n.op is Op.LINEAR:  # a quantized weight multiplies as many elements as a dense one
            w = n.attrs.in_features * n.attrs.out_features
            fwd += 2 * w
            bwd += 2 * w * rg[ir.inputs(n.id)[0]]  # the input gradient
            bwd += 2 * w * n.params[0].trainable  # the weight gradient
        elif n.op is Op.ATTENTION_CORE:
            d = n.attrs.heads * n.attrs.head_dim
            fwd += 4 * seq * d
            bwd += 8 * seq * d * rg[n.id]
    return fwd, fwd + bwd


def _checkpointed(ir: IR, rg: dict[str, bool], checkpoint: tuple[str, ...]) -> tuple[list, int]:
    """The saved tensors under checkpointing, in _saved's form, and the bytes per token of
    the largest piece's own saves, which its recomputation holds again during its
    backward. A recomputed node saves nothing; the first node of each piece saves the
    piece's inputs (what torch.utils.checkpoint keeps: the activations entering it)."""
    saved = _saved(ir, rg)
    pieces = {n.id: piece(n.id, checkpoint) for n in ir.nodes()}
    recomputed = {id: key for id, (key, again) in pieces.items() if again}
    members: dict[tuple, list[str]] = {}
    for id, key in recomputed.items():
        members.setdefault(key, []).append(id)
    own = {k: _bytes_of([x for x in saved if x[0] in ids], ir) for k, ids in members.items()}
    first = {ids[0]: k for k, ids in members.items()}
    out = []
    for id, shared, extra in saved:
        if id not in recomputed:
            out.append((id, shared, extra))
            continue
        inputs: set[str] = set()
        if id in first:
            ids = set(members[first[id]])
            inputs = {s for i in ids for s in ir.inputs(i) if s not in ids and _width(ir.node(s))}
        out.append((id, inputs, 0))
    return out, max(own.values(), default=0)


def _bytes_of(saved: list, ir: IR) -> int:
    shared = set().union(*(s for _, s, _ in saved))
    return sum(e for _, _, e in saved) + sum(_width(ir.node(i)) * 4 for i in shared)


def estimate(ir: IR, batch: int, seq: int, optimizer: str = "adamw",
             checkpoint: tuple[str, ...] | None = None, kernels: tuple[str, ...] | None = None) -> Cost:
    """The cost of one micro-batch of `batch` sequences of `seq` tokens; `checkpoint`, one
    choice per layer ("none", "full", "attn", "mlp"), is an execution plan's activation
    checkpointing, `kernels` its kernel swaps (effc.compiler.plan; None: those whose
    saved tensors the references' accounting describes, effc.compiler.plan.COSTED)."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"no cost model for optimizer '{optimizer}' (have: {', '.join(OPTIMIZER_STATES)})")
    held = _stored(ir)
    stored = [p for p in held if p.storage != "generated"]
    trainable = [p for p in stored if p.trainable]
    roles: dict[str, int] = {}
    for p in stored:
        roles[p.role] = roles.get(p.role, 0) + p.elements
    weights = sum(p.numel * DTYPE_BYTES[p.dtype] for p in held)
    grads = sum(p.numel * DTYPE_BYTES[p.dtype] for p in trainable)
    opt = sum(p.numel for p in trainable) * 4 * OPTIMIZER_STATES[optimizer]
    rg = _requires_grad(ir)
    prefix = prefix_length(ir)
    seq += prefix
    tokens = batch * seq
    saved, recompute = (_checkpointed(ir, rg, checkpoint) if checkpoint and any(c != "none" for c in checkpoint)
                        else (_saved(ir, rg), 0))
    fused = fused_head(ir) if kernels is not None and "linear_cross_entropy" in kernels else None
    per_step = sum(kind_of(n).saved_per_step(ir, n, rg) for n in ir.nodes() if n.op in ADAPTERS and rg[n.id])
    if fused:  # the fused loss saves the input gradient it computed in forward, not the log-probabilities
        head, loss = fused
        h = ir.inputs(head)[0]
        saved = [(id, set() if id == head else shared, 4 * _width(ir.node(h)) * rg[h] if id == loss else e)
                 for id, shared, e in saved]
        w = ir.node(head).params[0]
        per_step += w.numel * DTYPE_BYTES[w.dtype] if w.trainable else 0  # and the weight's gradient
    # The loss reads the input's own positions only: its log-probabilities skip the prefix.
    loss_only = sum(e for id, _, e in saved if ir.node(id).op is Op.LOSS)
    acts = tokens * _bytes_of(saved, ir) - batch * prefix * loss_only + per_step
    transient = tokens * (_transient_per_token(ir, rg, fused) + recompute)
    forward = tokens * _forward_peak_per_token(ir, rg, saved, fused)
    fwd, train = _flops(ir, rg, seq)
    # Gradients are freed (set to None) before forward, so forward's peak does not hold them.
    peak = weights + opt + max(grads + acts + transient, forward)
    return Cost(batch, seq, sum(p.elements for p in stored), sum(p.numel for p in trainable),
                tuple(sorted(roles.items())), weights, grads, opt, acts, transient,
                peak, fwd, train, _storage(ir))


def _storage(ir: IR) -> tuple[tuple[str, str], ...]:
    """What the compression edits did to storage: quantized weights (packed bytes against
    fp32), sparse weights (their zeros, not a speed-up: the matmuls stay dense) and shared
    layers (unique params against the unrolled model's)."""
    out = []
    quant: dict[str, list[int]] = {}  # storage -> [weights, packed bytes]
    for p in _stored(ir):
        if p.quantized:
            q = quant.setdefault(p.storage, [0, 0])
            q[0] += p.elements
            q[1] += p.numel * DTYPE_BYTES[p.dtype]
    for storage, (n, b) in sorted(quant.items()):
        out.append((f"quantized {storage}", f"{n:,} weights in {_size(b)} (fp32 {_size(4 * n)}, {b / (4 * n):.3f}x)"))
    qat: dict[str, int] = {}
    for p in _stored(ir):
        if p.storage.startswith("qat") and not p.path.endswith(".step"):
            qat[p.storage] = qat.get(p.storage, 0) + p.numel
    for storage, n in sorted(qat.items()):
        out.append((storage, f"{n:,} weights fake-quantized while training (held fp32, with their steps)"))
    sparse: dict[str, int] = {}
    for p in _stored(ir):
        if p.storage.startswith("sparse"):
            sparse[p.storage] = sparse.get(p.storage, 0) + p.numel
    for storage, n in sorted(sparse.items()):
        out.append((storage, f"{n:,} weights (zeros stored dense: no speed-up)"))
    loops = [p for p in ir.params() if p.storage == "shared" and p.role != "adapter"]
    if loops:
        unrolled = sum(p.elements for p in ir.params() if p.role != "adapter")
        unique = sum(p.elements for p in _stored(ir) if p.role != "adapter")
        layers = sorted({p.path.split(".", 1)[0] for p in loops})
        out.append(("shared layers", f"{len(layers)} layers reuse earlier blocks: {unique:,} unique base params "
                    f"of {unrolled:,} unrolled ({unique / unrolled:.3f}x)"))
    return tuple(out)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_cost(c: Cost) -> str:
    rows = [("params total", f"{c.params_total:,}"), ("params trainable", f"{c.params_trainable:,}")]
    rows += [(f"  {role}", f"{n:,}") for role, n in c.params_by_role]
    rows += [(f"bytes {k} (batch={c.batch}, seq={c.seq})" if k == "activations" else f"bytes {k}", _size(v))
             for k, v in (("weights", c.weight_bytes), ("gradients", c.grad_bytes),
                          ("optimizer", c.optimizer_bytes), ("activations", c.activation_bytes),
                          ("transient", c.transient_bytes), ("peak", c.peak_bytes))]
    rows += [("FLOPs/token forward", f"{c.flops_forward_per_token:,}"),
             ("FLOPs/token train step", f"{c.flops_train_per_token:,}")]
    rows += list(c.storage)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v:>18}" for k, v in rows) + "\n"
