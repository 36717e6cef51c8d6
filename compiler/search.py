"""The plan search: the fastest execution plan of a train step that fits its memory budget.

A candidate plan is costed twice, with nothing run: its peak memory per process
(effc.compiler.cost.estimate under the plan, then `per_process` for data parallelism)
and its step time (effc.compiler.timing.predict, from the device profile). Plans over the
budget are rejected; the others are ranked by predicted step time. Every plan computes
the same step (the same batch, the same gradient up to float rounding), so the fastest
is the best.

The space, one dimension per field, each collapsed to one value when the user pinned it
(`--plan key=value`, or `accumulate=` written in the train statement):
- accumulate: every distinct micro-batch size of a process's share of the batch;
- checkpoint: none, or attn, mlp or full on the first k layers, for every k (the layers
  of a model cost the same, so which k are recomputed changes neither memory nor time);
- kernels: each kernel swap that has a site in the model, on or off;
- shard (several processes): none (DDP), zero2, zero3;
- offload (beside a GPU: the profile's device is "cuda"): off, on.
The chosen plan is the fastest, except that plans predicted within TIE (3%) of the
fastest are a tie, which the plan with the fewest changes from the statement's own wins.
Precision and compile are never searched: bf16 changes what is computed by more than
rounding, and torch.compile's first compile (tens of seconds) is not in the time model;
they are the user's choice (`--plan precision=bf16`).

Spaces of at most `ENUMERATE` plans are enumerated. Larger ones are searched by
Metropolis sampling over single-field moves: the energy is the log of the predicted time
times a penalty for memory over the budget, the temperature is annealed geometrically;
one chain starts at the statement's own plan and the others at random plans, and a
greedy descent over moves of one or two fields finishes from the best point found. The walk
stops after `ITERATIONS` moves or `seconds` of wall time. It is seeded, so without the
time limit the same file gives the same plan.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, replace

from effc.compiler.cost import Cost, MemoryModel, fused_head
from effc.compiler.ir import IR, Op
from effc.compiler.plan import CHECKPOINT, KERNELS, SHARD, Plan
from effc.compiler.profile import DeviceProfile
from effc.compiler.timing import StepTime, Timer

ENUMERATE = 1024
# the kernel swaps that change what is saved (effc.compiler.cost); the others only time
MEMORY_KERNELS = ("linear_cross_entropy", "rms_norm", "swiglu")
ITERATIONS = 1000
PENALTY = 20.0  # energy factor per unit of relative overshoot of the budget
T_START, T_END = 0.3, 0.003  # temperature over log-time
# Predicted times closer than this are a tie (the time model is not that exact): the plan
# with the fewest changes from the statement's own wins it.
TIE = 0.03
CHAINS = 4  # independent Metropolis chains, ITERATIONS moves in all


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    cost: Cost  # one micro-batch on one process, as estimate() gives it
    memory: int  # predicted peak bytes per process
    time: StepTime
    fits: bool

    def parts(self) -> dict[str, int]:
        """The memory's parts, for saying which is largest."""
        c = self.cost
        return {"weights": c.weight_bytes, "gradients": c.grad_bytes, "optimizer state": c.optimizer_bytes,
                "activations": c.activation_bytes, "backward temporaries": c.transient_bytes}


@dataclass(frozen=True)
class Search:
    ranked: tuple[Candidate, ...]  # every evaluated plan that fits: the chosen first, then fastest first
    over: tuple[Candidate, ...]  # every evaluated plan over the budget, least memory first
    method: str  # "exhaustive" or "Metropolis"
    space: int  # plans in the space
    budget: int | None
    searched: tuple[str, ...]  # the fields searched (not pinned)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def smallest(self) -> Candidate:
        return min(self.ranked + self.over, key=lambda c: (c.memory, c.time.seconds))

    @property
    def evaluated(self) -> int:
        return len(self.ranked) + len(self.over)


def relevant_kernels(ir: IR) -> tuple[str, ...]:
    """The kernel swaps with a site in this model (the others change nothing)."""
    ops = {n.op for n in ir.nodes()}
    site = {
        "linear_cross_entropy": fused_head(ir) is not None,
        "quant_linear": any(p.quantized for p in ir.params()),
        "lora_linear": any(op.name == "LORA" for op in ops),
        "rms_norm": Op.RMSNORM in ops, "swiglu": Op.SWIGLU in ops, "rotary": Op.ROTARY in ops,
    }
    return tuple(k for k in KERNELS if site[k])


def per_process(model: MemoryModel, cost: Cost, plan: Plan, gpu: bool = False) -> int:
    """Peak bytes of one process's device under the plan's data parallelism (`cost`: the
    model's at the plan's micro-batch). DDP holds every tensor plus its gradient buckets
    (a second copy of the gradients); FSDP2 (zero2, zero3) shards a group a layer
    (effc.compiler.cost.MemoryModel.sharded); offload moves the shards to host memory,
    which on a `gpu` is not the device's (on a CPU it is the same memory, and saves
    nothing)."""
    if plan.fsdp is None:
        return cost.peak_bytes + (cost.grad_bytes if plan.world > 1 else 0)
    return model.sharded(cost.batch, plan.world, plan.fsdp, offload=plan.offload and gpu)


class _Space:
    def __init__(self, ir: IR, base: Plan, pinned: set[str], gpu: bool = False):
        self.base = base
        layers = len(base.checkpoint)
        per = base.per_process
        micro = sorted({math.ceil(per / a) for a in range(1, per + 1)}, reverse=True)
        accumulate = [math.ceil(per / m) for m in micro]
        self.dims: list[tuple[str, list]] = []
        if "accumulate" in pinned or "micro_batch" in pinned:
            self.dims.append(("accumulate", [base.accumulate]))
        else:
            self.dims.append(("accumulate", accumulate))
        layouts = [("none",) * layers] + [(mode,) * k + ("none",) * (layers - k)
                                          for mode in CHECKPOINT[1:] for k in range(1, layers + 1)]
        if base.checkpoint not in layouts:
            layouts.insert(0, base.checkpoint)
        self.dims.append(("checkpoint", [base.checkpoint] if "checkpoint" in pinned else layouts))
        for k in relevant_kernels(ir):
            self.dims.append((f"kernel:{k}", [k in base.kernels] if "kernels" in pinned else [True, False]))
        if base.world > 1:
            self.dims.append(("shard", [base.shard] if "shard" in pinned else list(SHARD)))
        if gpu and "offload" not in pinned:  # host memory is another memory only beside a GPU
            self.dims.append(("offload", [False, True]))
        self.size = math.prod(len(v) for _, v in self.dims)
        free = {"kernels" if name.startswith("kernel:") else name for name, v in self.dims if len(v) > 1}
        self.searched = tuple(f for f in ("accumulate", "checkpoint", "kernels", "shard", "offload") if f in free)

    def start(self) -> tuple[int, ...]:
        """The base plan's point (its accumulate rounded to the nearest listed one)."""
        point = []
        for name, values in self.dims:
            if name == "accumulate":
                v = min(values, key=lambda a: abs(a - self.base.accumulate))
            elif name == "checkpoint":
                v = self.base.checkpoint
            elif name.startswith("kernel:"):
                v = name[7:] in self.base.kernels
            elif name == "offload":
                v = self.base.offload
            else:
                v = self.base.shard
            point.append(values.index(v))
        return tuple(point)

    def plan(self, point: tuple[int, ...]) -> Plan:
        values = {name: vals[i] for (name, vals), i in zip(self.dims, point)}
        checkpoint = values["checkpoint"]
        kernels = tuple(k for k in KERNELS if values.get(f"kernel:{k}", k in self.base.kernels))
        offload = values.get("offload", self.base.offload)
        shard = values.get("shard", self.base.shard)
        if offload and shard == "none" and self.base.world > 1:  # offload is FSDP2's: the same plan as zero3
            shard = "zero3"
        return replace(self.base, accumulate=values["accumulate"], checkpoint=checkpoint, kernels=kernels,
                       shard=shard, offload=offload)

    def points(self):
        return itertools.product(*(range(len(v)) for _, v in self.dims))


def search(ir: IR, base: Plan, seq: int, profile: DeviceProfile, budget: int | None,
           pinned: set[str] = frozenset(), sequences_per_item: int = 1, method: str | None = None,
           seconds: float = 10.0, iterations: int = ITERATIONS, seed: int = 0) -> Search:
    """Search the plans around `base` (whose pinned fields stay) for the fastest that fits
    `budget` bytes per process (None: no limit). `method`: "exhaustive", "Metropolis", or
    None to choose by the space's size."""
    space = _Space(ir, base, set(pinned), gpu=profile.device == "cuda")
    timer = Timer(ir, seq, profile, base.precision, base.world, sequences_per_item)
    memo: dict[tuple, Candidate] = {}
    models: dict[tuple, MemoryModel] = {}

    def evaluate(point: tuple[int, ...]) -> Candidate:
        if point in memo:
            return memo[point]
        plan = space.plan(point)
        key = (plan.checkpoint, tuple(k for k in plan.kernels if k in MEMORY_KERNELS))
        if key not in models:
            models[key] = MemoryModel(ir, seq, checkpoint=plan.checkpoint, kernels=key[1], precision=plan.precision)
        cost = models[key].cost(plan.micro_batch * sequences_per_item)
        memory = per_process(models[key], cost, plan, gpu=profile.device == "cuda")
        t = timer.step(plan)
        memo[point] = Candidate(plan, cost, memory, t, budget is None or memory <= budget)
        return memo[point]

    chosen = method or ("exhaustive" if space.size <= ENUMERATE else "Metropolis")
    if chosen == "exhaustive":
        for point in space.points():
            evaluate(point)
    else:
        _metropolis(space, evaluate, budget, seconds, iterations, seed)
    unique = list({c.plan: c for c in memo.values()}.values())  # points that make the same plan, once
    ranked = sorted((c for c in unique if c.fits), key=lambda c: (c.time.seconds, c.memory))
    if ranked:  # among the plans within TIE of the fastest, the one nearest the statement's own
        near = [c for c in ranked if c.time.seconds <= ranked[0].time.seconds * (1 + TIE)]
        winner = min(near, key=lambda c: (_changes(c.plan, base), c.time.seconds))
        ranked.remove(winner)
        ranked.insert(0, winner)
    over = sorted((c for c in unique if not c.fits), key=lambda c: (c.memory, c.time.seconds))
    return Search(tuple(ranked), tuple(over), chosen, space.size, budget, space.searched)


def _changes(plan: Plan, base: Plan) -> int:
    """Fields (layers, kernels) in which a plan differs from the statement's own."""
    return ((plan.accumulate != base.accumulate) + sum(a != b for a, b in zip(plan.checkpoint, base.checkpoint))
            + len(set(plan.kernels) ^ set(base.kernels)) + (plan.shard != base.shard) + (plan.offload != base.offload))


def _energy(c: Candidate, budget: int | None) -> float:
    over = 0.0 if budget is None else max(0.0, c.memory / budget - 1.0)
    return math.log(c.time.seconds) + math.log1p(PENALTY * over)


def _metropolis(space: _Space, evaluate, budget, seconds: float, iterations: int, seed: int) -> None:
    """Metropolis chains over single-field moves, then a greedy descent from the best
    point found: every change of one field, or of two together (a smaller micro-batch
    with less checkpointing, say), is tried until none is better."""
    rng = random.Random(seed)
    movable = [i for i, (_, v) in enumerate(space.dims) if len(v) > 1]
    start = space.start()
    if not movable:
        evaluate(start)
        return
    deadline = time.monotonic() + seconds
    best, best_e = start, _energy(evaluate(start), budget)
    chains = CHAINS
    for chain in range(chains):
        # the first chain starts at the statement's own plan, the others anywhere
        point = start if chain == 0 else tuple(rng.randrange(len(v)) for _, v in space.dims)
        energy = _energy(evaluate(point), budget)
        steps = iterations // chains
        for step in range(steps):
            if time.monotonic() > deadline:
                break
            temperature = T_START * (T_END / T_START) ** (step / max(1, steps - 1))
            i = rng.choice(movable)
            values = space.dims[i][1]
            j = rng.randrange(len(values) - 1)
            j += j >= point[i]  # a different value
            proposal = point[:i] + (j,) + point[i + 1:]
            e = _energy(evaluate(proposal), budget)
            if e <= energy or rng.random() < math.exp((energy - e) / temperature):
                point, energy = proposal, e
                if e < best_e:
                    best, best_e = point, e
    improved = True
    while improved and time.monotonic() <= deadline:  # moves of one field, then of two together
        improved = False
        for i, k in [(i, i) for i in movable] + list(itertools.combinations(movable, 2)):
            for a in range(len(space.dims[i][1])):
                for b in range(len(space.dims[k][1])) if k != i else (a,):
                    proposal = list(best)
                    proposal[i], proposal[k] = a, b
                    e = _energy(evaluate(tuple(proposal)), budget)
                    if e < best_e - 1e-12:
                        best, best_e, improved = tuple(proposal), e, True


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def format_search(found: Search, title: str, top: int = 5) -> str:
    """What `effc plan` prints for one train step: how the space was searched, the best
    plans with their predicted peak memory, step time and tokens/s, and why the others
    were not chosen."""
    budget = f"budget {_size(found.budget)} per process" if found.budget is not None else "no memory budget"
    how = "enumerated" if found.method == "exhaustive" else f"Metropolis search, {found.evaluated} costed"
    lines = [f"# {title}",
             f"{found.space} plans ({how}); {budget}; searched: {', '.join(found.searched) or 'nothing (all pinned)'}"]
    shown = found.ranked[:top]
    if shown:
        width = max(len(c.plan.describe()) for c in shown)
        lines.append(f"  #  {'plan':<{width}}  {'peak memory':>11}  {'step time':>9}  {'tokens/s':>9}")
        for i, c in enumerate(shown, 1):
            lines.append(f"{i:>3}  {c.plan.describe():<{width}}  {_size(c.memory):>11}  {_seconds(c.time.seconds):>9}"
                         f"  {c.time.tokens_per_s:>9,.0f}")
        best = shown[0]
        if best.time.seconds > min(c.time.seconds for c in shown):
            lines.append(f"     #1 is within {TIE:.0%} of the fastest and nearer the statement's own plan")
        lines.append("     time of #1: " + ", ".join(f"{k} {_seconds(v)}" for k, v in best.time.parts))
    else:
        s = found.smallest
        lines.append(f"  no plan fits: the smallest needs {_size(s.memory)} ({s.plan.describe()})")
    rejected = []
    if found.over:
        nearest = found.over[0]
        rejected.append(f"{len(found.over)} over the budget (the nearest needs {_size(nearest.memory)}: "
                        f"{nearest.plan.describe()})")
    slower = found.ranked[top:]
    if slower:
        fastest = min(c.time.seconds for c in found.ranked)
        rejected.append(f"{len(slower)} slower than those shown (#{top + 1} at {slower[0].time.seconds / fastest:.2f}x "
                        f"the fastest step time, the slowest at {slower[-1].time.seconds / fastest:.1f}x)")
    if rejected:
        lines.append("  not chosen: " + "; ".join(rejected))
    return "\n".join(lines) + "\n"
