"""Time: the predicted seconds of one optimizer step under an execution plan, from the IR
and a device profile (effc.compiler.profile), without running anything.

Eager PyTorch spends a step's time in three ways, and the prediction adds them per op:
- matmuls (LINEAR, the low-rank adapters' products, attention) run at a roofline: the
  longer of FLOPs / the profile's matmul rate at that shape (the nearest measured shape,
  so small products get the small-shape rate) and bytes moved / memory bandwidth. Per
  linear: forward (tokens x in) @ (in x out); backward the input gradient when the input
  needs one and the weight gradient when the weight trains (cost.py's FLOP rules).
  Attention runs at the rate of a (seq x seq x head_dim) product; a causal mask halves
  its FLOPs (flash kernels skip the masked blocks); backward is BWD_ATTENTION x forward.
- every other op is memory-bound: each aten call it makes reads and writes about one
  activation of the op's width (`CALLS` counts calls per op in forward, measured with a
  dispatch counter on the reference graphs), so its time is calls x (per-call overhead +
  2 x 4 x tokens x width / bandwidth). A kernel swap replaces an op's calls by one
  custom op, whose overhead the profile measures. Backward makes BWD_CALLS x as many
  calls as forward for an op that needs a gradient.
- per-call overhead: the profile's tiny aten op (no autograd) times EAGER, the cost of
  recording autograd and running a step's Python around it.
A quantized linear dequantizes its weight in forward and again in backward (read the
packed bytes, write fp32). bf16 runs matmuls at the profile's bf16 rate and casts every
matmul weight once per micro-batch.

Then, per step:
- accumulation runs the micro-batches one after another (each at its own size's rates);
- activation checkpointing runs each recomputed piece's forward again in backward;
- the optimizer (AdamW, one tensor at a time) makes ADAM_CALLS calls per trainable tensor
  and moves ADAM_PASSES x 4 bytes per trainable element; clipping 3 calls and 2 passes;
- data parallelism (`world` > 1): each process computes its share of the batch;
  gradients are all-reduced (DDP: 2 (w-1)/w x gradient bytes at the all-reduce's bus
  bandwidth) or reduce-scattered ((w-1)/w x gradient bytes at the reduce-scatter's) with
  the parameters all-gathered ((w-1)/w x weight bytes at the all-gather's; FSDP2: zero2
  gathers once a step, zero3 in forward and again in backward), each at the rate
  `effc profile` measured for the backend (else COLLECTIVE_DEFAULT); offload beside a
  GPU adds the copies over the host link and runs AdamW at the host's memory bandwidth.
  Processes that share one CPU share its cores: each runs at
  1 / processes-per-node of the profiled rates.

The constants below were fitted once on the development machine against measured steps
(bench/plan_accuracy.py, which prints prediction against measurement; docs/planning.md).
torch.compile is predicted as eager. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from effc.compiler.adapters import kind_of, prefix_length
from effc.compiler.cost import _requires_grad, fused_head
from effc.compiler.ir import ADAPTERS, IR, Node, Op
from effc.compiler.plan import Plan, piece
from effc.compiler.profile import DeviceProfile

# aten calls per op in forward, on the reference graph (kernels=none)
CALLS = {Op.EMBEDDING: 1, Op.POSITION: 2, Op.RMSNORM: 7, Op.LAYERNORM: 3, Op.LINEAR: 4, Op.ROTARY: 12,
         Op.ATTENTION_CORE: 10, Op.SWIGLU: 2, Op.GELU: 1, Op.RESIDUAL_ADD: 1, Op.LOSS: 5, Op.POOL: 4}
ADAPTER_CALLS = 9  # an adapter's small products, scalings and sums
BWD_CALLS = 1.5  # backward calls per forward call
BWD_ATTENTION = 2.5  # attention backward / forward time (the scores are recomputed)
EAGER = 6.0  # a training call's overhead / the profile's bare aten call
# achieved / benchmarked matmul rate inside a training step (cold caches, threads waking)
MATMUL_EFFICIENCY = 0.9
ADAM_CALLS, ADAM_PASSES = 12, 12
COLLECTIVE_DEFAULT = 1e9  # bytes/s of an all-reduce when the profile has not measured one
# offload, where the profile has not measured the host: a PCIe 4 x16 link's copy rate and
# a server's host-memory copy rate, bytes/s (assumed, not measured)
HOST_LINK_DEFAULT, HOST_BANDWIDTH_DEFAULT = 2.0e10, 2.0e10
# The kernel swap that replaces each op's reference (effc.compiler.swaps)
SWAPPED = {Op.RMSNORM: "rms_norm", Op.SWIGLU: "swiglu", Op.ROTARY: "rotary"}


@dataclass(frozen=True)
class StepTime:
    seconds: float
    parts: tuple[tuple[str, float], ...]  # seconds by kind, summing to `seconds`
    tokens: int  # tokens a step reads, every process together
    profile: str  # the profile's source

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _roofline(p: DeviceProfile, m: int, n: int, k: int, dtype: str, share: float, elem: int = 4) -> float:
    flops = 2.0 * m * n * k
    bytes_ = elem * (m * k + k * n + m * n)
    return max(flops / (p.matmul_rate(m, n, k, dtype) * share * MATMUL_EFFICIENCY), bytes_ / (p.bandwidth * share))


def _width(n: Node) -> int:
    return n.shape[-1] if n.shape else 1


# The kernel swaps that change an op's time
_KERNELS_OF = {Op.LINEAR: {"linear_cross_entropy", "quant_linear"}, Op.LOSS: {"linear_cross_entropy"},
               Op.LORA: {"lora_linear"}, Op.RMSNORM: {"rms_norm"}, Op.SWIGLU: {"swiglu"}, Op.ROTARY: {"rotary"}}


class _Model:
    """Per-op times of one IR at one precision, on `share` of the profiled device, for
    any kernel set; each op's time is computed once per (op, tokens, its kernels)."""

    def __init__(self, ir: IR, seq: int, p: DeviceProfile, precision: str, share: float):
        self.ir, self.seq, self.p, self.share = ir, seq + prefix_length(ir), p, share
        self.rg = _requires_grad(ir)
        self.dtype = "bfloat16" if precision == "bf16" else "float32"
        self.head = fused_head(ir)
        self.call = p.overhead.get("aten_op", 2e-6) * EAGER / share
        self.custom = p.overhead.get("custom_op", 5e-5) / share
        self.cache: dict[tuple, tuple[float, float, str]] = {}

    def time(self, n: Node, tokens: int, kernels: tuple[str, ...]) -> tuple[float, float, str]:
        """(forward seconds, backward seconds, kind) of node n over `tokens` tokens."""
        mine = tuple(k for k in kernels if k in _KERNELS_OF.get(n.op, ()))
        key = (n.id, tokens, mine)
        if key not in self.cache:
            self.cache[key] = self._node(n, tokens, mine)
        return self.cache[key]

    def _calls(self, calls: float, tokens: int, width: int) -> float:
        return calls * (self.call + 8.0 * tokens * width / (self.p.bandwidth * self.share))

    def _node(self, n: Node, tokens: int, kernels: tuple[str, ...]) -> tuple[float, float, str]:
        """`time` for the kernel swaps of n's op that are on (`kernels`)."""
        ir, rg, p, s = self.ir, self.rg, self.p, self.share
        grad = rg[n.id]
        fused = self.head if "linear_cross_entropy" in kernels else None
        if n.op is Op.LINEAR and not (fused and n.id == fused[0]):
            a = n.attrs
            src = ir.inputs(n.id)[0]
            fwd = _roofline(p, tokens, a.out_features, a.in_features, self.dtype, s)
            bwd = _roofline(p, tokens, a.in_features, a.out_features, self.dtype, s) * rg[src]
            bwd += _roofline(p, a.out_features, a.in_features, tokens, self.dtype, s) * n.params[0].trainable
            calls = self._calls(CALLS[Op.LINEAR], 0, 0)
            fwd, bwd = fwd + calls, bwd + calls * BWD_CALLS * grad
            packed = [q for q in n.params if q.quantized]
            if packed:  # dequantize: read the packed tensors, write fp32; again in backward
                weights = a.in_features * a.out_features
                moved = sum(q.numel for q in packed) + 4 * weights
                # unpack, shift, scale, reshape, cast: ~6 calls (each one custom op when swapped)
                deq = moved / (p.bandwidth * s) + 6 * (self.custom if "quant_linear" in kernels else self.call)
                fwd, bwd = fwd + deq, bwd + deq * rg[src]
            if self.dtype == "bfloat16":  # autocast casts the weight once a micro-batch
                fwd += 6.0 * a.in_features * a.out_features / (p.bandwidth * s) + self.call
            return fwd, bwd, "matmul"
        if fused and n.id in fused:
            if n.id == fused[0]:
                return 0.0, 0.0, "matmul"
            head = ir.node(fused[0])
            a = head.attrs  # the head's products (forward, and its gradients in forward), and softmax - onehot
            mm = _roofline(p, tokens, a.out_features, a.in_features, self.dtype, s)
            mm += _roofline(p, tokens, a.in_features, a.out_features, self.dtype, s)
            mm += _roofline(p, a.out_features, a.in_features, tokens, self.dtype, s) * head.params[0].trainable
            elementwise = 3 * 8.0 * tokens * a.out_features / (p.bandwidth * s)
            return mm + elementwise + self.custom, self.custom + self.call, "matmul"
        if n.op in ADAPTERS:
            f, b = kind_of(n).flops(ir, n, rg)  # per token
            small = p.matmul_rate(tokens, 16, 16, self.dtype) * s
            moved = 3 * 8.0 * tokens * _width(n) / (p.bandwidth * s)
            lora = n.op.name == "LORA" and "lora_linear" in kernels
            calls = self.custom if lora else ADAPTER_CALLS * self.call
            return tokens * f / small + moved + calls, (tokens * b / small + moved + calls * BWD_CALLS) * grad, "adapters"
        if n.op is Op.ATTENTION_CORE:
            a = n.attrs
            flops = 4.0 * tokens * self.seq * a.heads * a.head_dim * (0.5 if a.causal else 1.0)
            t = flops / (p.matmul_rate(self.seq, self.seq, a.head_dim, self.dtype) * s)
            t += self._calls(CALLS[n.op], tokens, a.heads * a.head_dim)
            return t, t * BWD_ATTENTION * grad, "attention"
        swapped = SWAPPED.get(n.op) in kernels
        if swapped:
            passes = {Op.RMSNORM: 2, Op.SWIGLU: 3, Op.ROTARY: 2}[n.op]
            fwd = self.custom + passes * 8.0 * tokens * _width(n) / (p.bandwidth * s)
            return fwd, fwd * 1.5 * grad, "other ops"
        width = _width(ir.node(ir.inputs(n.id)[0])) if n.op is Op.LOSS else _width(n)
        fwd = self._calls(CALLS.get(n.op, 2), tokens, width)
        return fwd, fwd * BWD_CALLS * grad, "other ops"


def _shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts) if base + (i < extra) > 0]


class Timer:
    """Step times of one IR at one precision and process count, for any plan: the plan
    search asks it for thousands of plans, and each op's time is computed once."""

    def __init__(self, ir: IR, seq: int, profile: DeviceProfile, precision: str = "fp32", world: int = 1,
                 sequences_per_item: int = 1, procs_per_node: int | None = None):
        procs = procs_per_node or (world if profile.device == "cpu" else 1)
        self.share = 1.0 / max(1, procs)
        self.ir, self.profile, self.items = ir, profile, sequences_per_item
        self.model = _Model(ir, seq, profile, precision, self.share)
        self.nodes = ir.nodes()
        trainable = [q for q in ir.params() if q.trainable and q.tied_to is None and q.storage != "generated"]
        self.tensors, self.elements = len(trainable), sum(q.numel for q in trainable)
        self.weight_bytes = 4.0 * sum(q.numel for q in ir.params() if q.tied_to is None and not q.quantized)
        self.passes: dict[tuple, list[tuple[str, float]]] = {}

    def _pass(self, tokens: int, kernels: tuple[str, ...], checkpoint: tuple[str, ...]) -> list[tuple[str, float]]:
        """Seconds by kind of one micro-batch's forward and backward."""
        key = (tokens, kernels, checkpoint)
        if key not in self.passes:
            m, parts = self.model, {}
            for n in self.nodes:
                fwd, bwd, kind = m.time(n, tokens, kernels)
                parts[kind] = parts.get(kind, 0.0) + fwd + bwd
                if m.rg[n.id] and piece(n.id, checkpoint)[1]:
                    parts["recompute"] = parts.get("recompute", 0.0) + fwd
            self.passes[key] = list(parts.items())
        return self.passes[key]

    def step(self, plan: Plan) -> StepTime:
        m, profile = self.model, self.profile
        parts: dict[str, float] = {}
        mine = _shares(plan.batch, plan.world)[0]  # the largest share: the others wait for it
        for micro in _shares(mine, plan.accumulate):
            for kind, t in self._pass(micro * self.items * m.seq, plan.kernels, plan.checkpoint):
                parts[kind] = parts.get(kind, 0.0) + t
        bw = profile.bandwidth * self.share
        parts["optimizer"] = self.tensors * (ADAM_CALLS + 3) * m.call + (ADAM_PASSES + 2) * 4.0 * self.elements / bw
        if plan.offload and profile.device == "cuda":
            # the step runs on the host, over this process's shards; each gather first copies
            # the weights' shards to the device, and the reduced gradients' shards come back
            host_bw = profile.host.get("bandwidth", HOST_BANDWIDTH_DEFAULT)
            parts["optimizer"] = (self.tensors * (ADAM_CALLS + 3) * m.call
                                  + (ADAM_PASSES + 2) * 4.0 * self.elements / plan.world / host_bw)
            gathers = 2 if plan.fsdp == "zero3" else 1
            moved = (gathers * self.weight_bytes + 4.0 * self.elements) / plan.world
            parts["offload"] = moved / profile.host.get("link", HOST_LINK_DEFAULT)
        if plan.world > 1:
            w = plan.world
            grads = 4.0 * self.elements
            backend = "nccl" if profile.device == "cuda" else "gloo"

            def rate(op: str) -> float:
                return profile.collective_rate(backend, op) or COLLECTIVE_DEFAULT

            if plan.fsdp is None:
                seconds = 2 * grads / rate("all_reduce")
            else:  # reduce-scatter the gradients; all-gather the parameters once (zero2) or twice (zero3)
                gathers = 2 if plan.fsdp == "zero3" else 1
                seconds = grads / rate("reduce_scatter") + gathers * self.weight_bytes / rate("all_gather")
            parts["communication"] = seconds * (w - 1) / w
        total = sum(parts.values())
        return StepTime(total, tuple(sorted(parts.items(), key=lambda kv: -kv[1])),
                        plan.batch * self.items * m.seq, profile.source)


def predict(ir: IR, plan: Plan, seq: int, profile: DeviceProfile, sequences_per_item: int = 1,
            procs_per_node: int | None = None) -> StepTime:
    """The predicted time of one optimizer step of `plan` (its whole batch, on every
    process). `sequences_per_item`: 2 for a sentence encoder's (anchor, positive) pairs.
    `procs_per_node`: processes sharing one machine (default: all of `plan.world` on a
    CPU, one per device on a GPU)."""
    return Timer(ir, seq, profile, plan.precision, plan.world, sequences_per_item, procs_per_node).step(plan)
