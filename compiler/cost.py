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
  activations (reported; the backward walk below uses each op's own): the loss, the gradients of the log-probabilities and of the logits
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
- precision bf16 (autocast): every dense linear weight's bf16 copy (2 bytes an element)
  is held in forward and kept for backward;
- peak = weights + optimizer + the largest of forward, backward and the optimizer step
  (gradients, and two temporaries of the largest trainable tensor). Backward is walked
  op by op in reverse: at each op, the activations not yet freed (a tensor saved by
  several ops is freed after the earliest one's backward; a recomputed piece's own
  saves live from its recomputation until freed within it), the gradients of the params
  whose ops have run backward, and the op's own temporaries (those of `transient`).
  Measured against a tensor-level tracker (tests/runtime/test_memory.py and
  bench/plan_accuracy.py) it is within 10% at every point, mostly within 2%.

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
from effc.compiler.plan import COSTED, graph_pieces, layer_count, piece

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
    # the peak's moments beside weights and optimizer state: forward's, and backward's
    # (gradients included); data parallelism reweighs them (effc.compiler.search.per_process)
    forward_bytes: int = 0
    backward_bytes: int = 0


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


def _saved(ir: IR, rg: dict[str, bool], kernels: tuple[str, ...] = COSTED) -> list[tuple[str, set[str], int]]:
    """Per node in topological order: (id, ids of the tensors it saves that others may
    save too, bytes of tensors private to it); see the module docstring for each op.
    Without the `rms_norm` and `swiglu` kernel swaps the reference compositions save one
    tensor more: x * rstd (dim, when the norm's weight trains) and silu(gate) (ffn)."""
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
            if "rms_norm" not in kernels and trainable:
                extra += 4 * _width(n)
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
            if "swiglu" not in kernels:
                extra += 4 * _width(n)
        elif n.op is Op.LOSS:
            extra += _width(ir.node(ins[0])) * 4  # the log-probabilities
        out.append((n.id, shared, extra))
    return out


def _forward_temporaries(ir: IR, n: Node, kernels: tuple[str, ...] = COSTED) -> int:
    """Floats per token an op allocates in forward besides its output (the fused SwiGLU
    and RMSNorm kernels allocate none)."""
    if n.op is Op.ATTENTION_CORE:
        a = n.attrs
        copies = 2 * a.heads * a.head_dim if a.kv_heads != a.heads else 0  # repeated k and v
        return copies + a.heads  # and the logsumexp
    if n.op in ADAPTERS:
        return kind_of(n).forward_temporaries(ir, n)
    if n.op is Op.SWIGLU and "swiglu" in kernels or n.op is Op.RMSNORM and "rms_norm" in kernels:
        return 0
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


def _forward_peak_per_token(ir: IR, rg: dict[str, bool], saved: list, fused: tuple[str, str] | None,
                            kernels: tuple[str, ...] = COSTED) -> int:
    """Bytes per token live at the worst moment of forward: what was saved so far, every
    output still waiting for a consumer (the residual stream), and the op's own output
    and temporaries. With the head and loss `fused`, the logits never exist: the head has
    no output, and the loss holds one chunk of logits (min(vocab, dim) floats a token at
    the default chunk) and the input gradient (dim) it computes in forward."""
    nodes = ir.nodes()
    index = {n.id: i for i, n in enumerate(nodes)}
    last_use = {n.id: max((index[c] for c in ir.outputs(n.id)), default=index[n.id]) for n in nodes}
    dies: dict[int, list[str]] = {}  # op index -> outputs no longer waiting after it
    for id, i in last_use.items():
        dies.setdefault(i, []).append(id)
    live: set[str] = set()  # saved so far, or waiting for a consumer
    saved_ids: set[str] = set()
    floats = extra = worst = 0
    for i, ((id, shared, e), n) in enumerate(zip(saved, nodes)):
        extra += e
        for t in shared | {n.id}:
            if t not in live and not (fused and t == fused[0]):
                live.add(t)
                floats += _width(ir.node(t))
        saved_ids |= shared
        temporaries = _forward_temporaries(ir, n, kernels)
        if fused and n.id == fused[1]:
            d, v = _width(ir.node(ir.inputs(fused[0])[0])), _width(ir.node(fused[0]))
            temporaries = min(v, d) + d
        worst = max(worst, extra + 4 * (floats + temporaries))
        for t in dies.get(i, ()):  # consumed by op i for the last time: gone unless saved
            if t in live and t not in saved_ids:
                live.discard(t)
                floats -= _width(ir.node(t))
    return worst


def _node_transient(ir: IR, n: Node, rg: dict[str, bool], fused: tuple[str, str] | None = None) -> int:
    """Floats per token of the temporaries node n's backward holds beside the saved
    activations (see the module docstring)."""
    if not rg[n.id]:
        return 0
    if fused and n.id == fused[1]:  # the saved input gradient scaled, and its sum into the input's
        return 2 * _width(ir.node(ir.inputs(fused[0])[0]))
    if n.op is Op.LOSS:
        return 2 * _width(ir.node(ir.inputs(n.id)[0]))  # grads of the log-probs and the logits
    if n.op is Op.SWIGLU:
        return 4 * _width(n)  # output grad, sigmoid, and the two input grads
    if n.op in NORMS:
        return 4 * _width(n)  # output grad, its product with w, x * rstd, and their product
    return _width(n) + sum(_width(ir.node(i)) for i in ir.inputs(n.id))  # output and input grads


def _transient_per_token(ir: IR, rg: dict[str, bool], fused: tuple[str, str] | None = None) -> int:
    """Bytes per token of the largest set of temporaries one op's backward holds beside
    the saved activations."""
    return 4 * max((_node_transient(ir, n, rg, fused) for n in ir.nodes()), default=0)


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


def _fuse(ir: IR, saved: list, fused: tuple[str, str] | None, rg: dict[str, bool]) -> list:
    """The saves with the head and loss fused: the head saves nothing, the loss the input
    gradient it computed in forward (not the log-probabilities)."""
    if not fused:
        return saved
    head, loss = fused
    h = ir.inputs(head)[0]
    return [(id, set() if id == head else shared, 4 * _width(ir.node(h)) * rg[h] if id == loss else e)
            for id, shared, e in saved]


def _checkpointed(ir: IR, saved: list, checkpoint: tuple[str, ...]) -> tuple[list, dict[tuple, list[int]]]:
    """The saved tensors under checkpointing, in _saved's form, and each recomputed
    piece's node indices. A recomputed node saves nothing; the first node of each piece
    saves the piece's inputs (what torch.utils.checkpoint keeps: the activations entering
    it)."""
    members: dict[tuple, list[int]] = {}
    for i, n in enumerate(ir.nodes()):
        key, again = piece(n.id, checkpoint)
        if again:
            members.setdefault(key, []).append(i)
    first = {ids[0]: k for k, ids in members.items()}
    nodes = ir.nodes()
    out = []
    for i, (id, shared, extra) in enumerate(saved):
        key, again = piece(id, checkpoint)
        if not again:
            out.append((id, shared, extra))
            continue
        inputs: set[str] = set()
        if i in first:
            ids = {nodes[j].id for j in members[key]}
            inputs = {s for m in ids for s in ir.inputs(m) if s not in ids and _width(ir.node(s))}
        out.append((id, inputs, 0))
    return out, members


def _backward_lines(ir: IR, rg: dict[str, bool], saved: list, plain: list, pieces: dict[tuple, list[int]],
                    fused: tuple[str, str] | None, scale, grad_of: dict[int, int],
                    ahead: int) -> list[tuple[int, int, int]]:
    """The bytes live at each op's backward, walking the ops in reverse, as (bytes that do
    not grow with the batch, bytes per sequence, bytes per sequence without the op's own
    temporaries); the peak at a batch of b sequences is the largest const + b *
    per_sequence. Live are: the
    activations not yet freed (a tensor saved by several ops is freed after the earliest
    one's backward; a recomputed piece's own saves exist from its recomputation, when
    backward reaches its last op, until they are freed within it), the gradients of the
    params whose ops have run backward (`grad_of`: bytes by the op index that allocates
    them), `ahead` bytes live throughout (saved once a step) and the op's own
    temporaries. `scale(i, per_token)` turns bytes per token of op i into bytes a sequence."""
    nodes = ir.nodes()
    index = {n.id: i for i, n in enumerate(nodes)}
    intervals: list[tuple[int, int, int]] = []  # (from op, to op, bytes): live while from <= i <= to
    end = len(nodes)

    def add(entries, limit, members=None):
        first_saver: dict[str, int] = {}
        for i, (id, shared, extra) in entries:
            for t in shared:
                if members is None or index[t] in members:  # a piece's inputs are held for it already
                    first_saver[t] = min(first_saver.get(t, i), i)
            if extra:
                intervals.append((i, limit, scale(i, extra)))
        for t, i in first_saver.items():
            intervals.append((i, limit, scale(index[t], 4 * _width(ir.node(t)))))

    add(list(enumerate(saved)), end)
    for ids in pieces.values():
        add([(i, plain[i]) for i in ids], ids[-1], set(ids))
    starts: dict[int, int] = {}  # walking down: bytes that become live at op i, and that die below op i
    ends: dict[int, int] = {}
    for lo, hi, b in intervals:
        starts[min(hi, end - 1)] = starts.get(min(hi, end - 1), 0) + b
        ends[lo] = ends.get(lo, 0) + b
    lines, grads, live = [], ahead, 0
    for i in range(end - 1, -1, -1):
        grads += grad_of.get(i, 0)
        live += starts.get(i, 0)
        lines.append((grads, live + scale(i, 4 * _node_transient(ir, nodes[i], rg, fused)), live))
        live -= ends.get(i, 0)
    return lines


def _bytes_of(saved: list, ir: IR) -> int:
    shared = set().union(*(s for _, s, _ in saved))
    return sum(e for _, _, e in saved) + sum(_width(ir.node(i)) * 4 for i in shared)


class MemoryModel:
    """The memory of a train step under one plan as a function of the micro-batch:
    everything per sequence is computed once, so `cost(batch)` is cheap (the plan search
    asks it for every micro-batch size)."""

    def __init__(self, ir: IR, seq: int, optimizer: str = "adamw", checkpoint: tuple[str, ...] | None = None,
                 kernels: tuple[str, ...] | None = None, precision: str = "fp32"):
        if optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"no cost model for optimizer '{optimizer}' (have: {', '.join(OPTIMIZER_STATES)})")
        held = _stored(ir)
        stored = [p for p in held if p.storage != "generated"]
        trainable = [p for p in stored if p.trainable]
        roles: dict[str, int] = {}
        for p in stored:
            roles[p.role] = roles.get(p.role, 0) + p.elements
        self.weights = sum(p.numel * DTYPE_BYTES[p.dtype] for p in held)
        self.grads = sum(p.numel * DTYPE_BYTES[p.dtype] for p in trainable)
        self.opt = sum(p.numel for p in trainable) * 4 * OPTIMIZER_STATES[optimizer]
        self.params_total, self.params_trainable = sum(p.elements for p in stored), sum(p.numel for p in trainable)
        self.roles = tuple(sorted(roles.items()))
        rg = _requires_grad(ir)
        prefix = prefix_length(ir)
        self.seq = seq = seq + prefix
        fused = fused_head(ir) if kernels is not None and "linear_cross_entropy" in kernels else None
        plain = _fuse(ir, _saved(ir, rg, COSTED if kernels is None else kernels), fused, rg)
        saved, pieces = (_checkpointed(ir, plain, checkpoint) if checkpoint and any(c != "none" for c in checkpoint)
                         else (plain, {}))
        nodes = ir.nodes()
        per_step = sum(kind_of(n).saved_per_step(ir, n, rg) for n in nodes if n.op in ADAPTERS and rg[n.id])
        # where each trainable param's gradient appears in backward: at the last op reading it
        by_path = {p.path: p for p in trainable}
        grad_at: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for p in n.params:
                key = p.tied_to or p.path
                if key in by_path:
                    grad_at[key] = i
        if fused:  # the fused loss computes a trainable head's weight gradient in forward
            w = ir.node(fused[0]).params[0]
            if w.trainable:
                grad_at.pop(w.tied_to or w.path, None)
                if w.tied_to is None:  # a tied head's gradient still adds into the embedding's in backward
                    per_step += w.numel * DTYPE_BYTES[w.dtype]
        grad_of: dict[int, int] = {}
        for key, i in grad_at.items():
            grad_of[i] = grad_of.get(i, 0) + by_path[key].numel * DTYPE_BYTES[by_path[key].dtype]

        def scale(i: int, per_token: int) -> int:
            # The loss reads the input's own positions only: its log-probabilities skip the prefix.
            return per_token * (seq - prefix if nodes[i].op is Op.LOSS else seq)

        # bytes per sequence unless said otherwise
        self.per_step = per_step
        self.acts = sum(scale(i, e) for i, (_, _, e) in enumerate(saved))
        self.acts += sum(4 * _width(ir.node(t)) * seq for t in set().union(*(s for _, s, _ in saved)))
        recompute = max((_bytes_of([plain[i] for i in ids], ir) for ids in pieces.values()), default=0)
        self.transient = seq * (_transient_per_token(ir, rg, fused) + recompute)
        self.forward = seq * _forward_peak_per_token(ir, rg, saved, fused, COSTED if kernels is None else kernels)
        self.backward = (_backward_lines(ir, rg, saved, plain, pieces, fused, scale, grad_of, per_step)
                         if any(rg.values()) else [(0, 0, 0)])
        self.groups = _Groups(ir, held, by_path, grad_of, checkpoint or ("none",) * layer_count(ir))
        # AdamW's step (one tensor at a time) holds a temporary or two of the largest param
        self.step = self.grads + 2 * max((p.numel * 4 for p in trainable), default=0)
        self.flops = _flops(ir, rg, seq)
        self.copies = 0  # bf16 autocast's weight copies, held from forward through backward
        if precision == "bf16":
            self.copies = 2 * sum(n.attrs.in_features * n.attrs.out_features for n in nodes
                                  if n.op is Op.LINEAR and not any(p.quantized for p in n.params))
        self.storage = _storage(ir)

    def sharded(self, batch: int, world: int, mode: str, offload: bool = False) -> int:
        """Peak bytes of one of `world` processes under FSDP2 ("zero2" / "zero3"), as
        effc.runtime.distributed shards: one group a piece of the graph (a layer, or a
        sublayer when checkpointing splits it; the embedding before the layers and the
        head after them), owning the params only it reads, and the root group for params
        several pieces read (a tied embedding and head). Every process holds 1/world of
        the weights and optimizer state. A group's weights are gathered at its forward
        (and, for zero3, again at its backward, with the next group's prefetched), kept
        until its backward ends (zero2) or its forward ends (zero3); its gradients are
        whole while its backward runs, then reduce-scattered to 1/world through a copy
        of them, which FSDP2 keeps until the next group's reduce-scatter. The root's are
        gathered throughout and reduced at the end. `offload`: the shards of weights,
        gradients and optimizer state live in host memory (FSDP2's CPUOffloadPolicy), so
        the device holds only what is gathered, the activations and the gradients in
        flight, and the optimizer step runs on the host."""
        g = self.groups
        base = 0 if offload else (self.weights + self.opt) // world
        # forward, at its peak (the head and loss, last): every group gathered (zero2), or
        # the largest (zero3), beside forward's activations
        gathered = g.root_w + (sum(g.w) if mode == "zero2" else max(g.w, default=0))
        forward = base + gathered + batch * self.forward + self.copies
        peak = forward
        n = len(self.backward)
        grads = self.per_step  # whole gradients of the root and of the group in backward
        shards = 0  # the finished groups' reduced gradients
        open_w = sum(g.w)  # zero2: groups whose backward has not finished hold their weights
        pending = 0  # the last reduce-scatter's input, kept until the next one
        for j, (_, per_seq, held) in enumerate(self.backward):
            i = n - 1 - j  # the op whose backward this line is
            k = g.of[i]
            if mode == "zero2":
                weights = g.root_w + open_w
            else:  # the group in backward and the next one, prefetched
                weights = g.root_w + g.w[k] + g.prefetch(k)
                if g.last[k] == i:  # k's backward starts: the prefetch's all-gather buffer, before any op runs
                    peak = max(peak, base + weights + g.prefetch(k) + grads + shards + batch * held + self.copies)
            grads += g.grad_at[i]
            peak = max(peak, base + weights + grads + shards + pending + batch * per_seq + self.copies)
            if g.first[k] == i:  # group k's backward ends: reduce-scatter its gradients
                peak = max(peak, base + weights + grads + shards + g.g[k] + batch * per_seq + self.copies)
                pending = g.g[k]
                grads -= g.g[k]
                shards += 0 if offload else g.g[k] // world
                open_w -= g.w[k]
        step = 0 if offload else base + (self.grads + 2 * max(g.w + [g.root_w])) // world  # AdamW on the shards
        return max(peak, step)

    def cost(self, batch: int) -> Cost:
        backward = max(c + batch * b for c, b, _ in self.backward) + self.copies
        forward = batch * self.forward + self.copies
        # Gradients are freed (set to None) before forward, so forward's peak does not hold them.
        peak = self.weights + self.opt + max(backward, forward, self.step)
        return Cost(batch, self.seq, self.params_total, self.params_trainable, self.roles, self.weights,
                    self.grads, self.opt, batch * self.acts + self.per_step, batch * self.transient, peak,
                    self.flops[0], self.flops[1], self.storage, forward, backward)


class _Groups:
    """FSDP2's groups as the runtime makes them (effc.runtime.planned.forward_of with
    `own`): each op's piece -- `piece`'s key, or the embedding before the layers and the
    head after them -- and the bytes of weights and gradients each piece owns (params no
    other piece reads); a param read by several pieces belongs to the root."""

    def __init__(self, ir: IR, held: list[ParamRecord], trainable: dict[str, ParamRecord], grad_of: dict[int, int],
                 checkpoint: tuple[str, ...]):
        keys: dict[tuple, int] = {}
        nodes = ir.nodes()
        self.of = [keys.setdefault(key, len(keys)) for key, _ in graph_pieces((n.id for n in nodes), checkpoint)]
        readers: dict[str, set[int]] = {}
        for i, n in enumerate(nodes):
            for p in n.params:
                readers.setdefault(p.tied_to or p.path, set()).add(self.of[i])
        self.w, self.g = [0] * len(keys), [0] * len(keys)  # the groups' weight and gradient bytes
        self.root_w = 0  # (the root's gradients stay whole until the end: grad_at counts them)
        for p in held:
            r = readers.get(p.path, set())
            b = p.numel * DTYPE_BYTES[p.dtype]
            if len(r) != 1:
                self.root_w += b
                continue
            (k,) = r
            self.w[k] += b
            self.g[k] += b if p.path in trainable else 0
        self.first, self.last = {}, {}  # group -> its first op, its last
        for i, k in enumerate(self.of):
            self.first.setdefault(k, i)
            self.last[k] = i
        # the gradient bytes each op's backward allocates (a group's are released at its end)
        self.grad_at = [grad_of.get(i, 0) for i in range(len(nodes))]

    def prefetch(self, k: int) -> int:
        """Weights of the group whose backward comes after k's (gathered while k's runs)."""
        return self.w[k - 1] if k > 0 else 0


def estimate(ir: IR, batch: int, seq: int, optimizer: str = "adamw",
             checkpoint: tuple[str, ...] | None = None, kernels: tuple[str, ...] | None = None,
             precision: str = "fp32") -> Cost:
    """The cost of one micro-batch of `batch` sequences of `seq` tokens; `checkpoint`, one
    choice per layer ("none", "full", "attn", "mlp"), is an execution plan's activation
    checkpointing, `kernels` its kernel swaps (effc.compiler.plan; None: those whose
    saved tensors the references' accounting describes, effc.compiler.plan.COSTED),
    `precision` its precision: under bf16 autocast every dense linear weight has a bf16
    copy (2 bytes an element), cast in forward and kept for backward."""
    return MemoryModel(ir, seq, optimizer, checkpoint, kernels, precision).cost(batch)


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
