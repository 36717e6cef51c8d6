"""Execution plans: how one `train` step is computed, as opposed to what it computes.

A `Plan` is stored in the build (`build.json`, `plan.txt`) and realised by the runtime
(`effc.runtime.planned`); every field changes speed or memory, none changes the model
or the gradient beyond float rounding:

- `accumulate`: the step's `batch` sequences run as this many micro-batches (sizes
  differing by at most one); `micro_batch` is the largest of them;
- `checkpoint`: activation checkpointing, one entry per transformer layer: "none",
  "full" (the layer's activations are recomputed in backward instead of kept), "attn" or
  "mlp" (only that sublayer is recomputed);
- `precision`: "fp32", or "bf16" (forward and backward under torch.autocast to
  bfloat16; params, gradients and optimizer state stay float32);
- `kernels`: the kernel swaps applied to the fx graph (`KERNELS`, effc.compiler.swaps);
- `compile`: the forward runs through torch.compile;
- `world`: data-parallel processes (`effc run --nproc N`, times `--nnodes`); each takes
  its share of the step's batch (sizes differing by at most one) and gradients are
  averaged across them; set by the launch, never by `--plan`;
- `shard`: what data parallelism shards, in the spirit of ZeRO's stages: "none" (DDP:
  every process holds every tensor), "zero2" (FSDP2 `fully_shard` with parameters kept
  gathered from forward to the end of backward: gradients and optimizer state sharded),
  "zero3" (FSDP2 resharding after forward: parameters sharded too, gathered a layer at
  a time);
- `offload`: every parameter, gradient and AdamW state lives in host memory (FSDP2's
  CPUOffloadPolicy); the GPU holds a layer's gathered weights at a time, and the
  optimizer steps on the CPU. Always through FSDP2, even with one process: zero3 unless
  `shard` says zero2 (`fsdp`). Meant for a GPU: on the CPU the tensors are in host
  memory already and it saves nothing.

The default plan is the statement's own (`accumulate=` of the train statement) with no
checkpointing, fp32, every kernel and no compile. `effc run --plan key=value` and
`effc build --plan key=value` override fields (`parse_overrides`); the plan search of a
later version chooses them under a memory budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

# The kernel swaps (effc.compiler.swaps), in the order they run.
KERNELS = ("linear_cross_entropy", "quant_linear", "lora_linear", "rms_norm", "swiglu", "rotary")
# Those whose saved tensors the cost model counts by default (`estimate(kernels=None)`):
# the references' accounting, which the fused LoRA linear keeps and the fused head + loss
# does not.
COSTED = ("quant_linear", "rms_norm", "swiglu", "rotary")

CHECKPOINT = ("none", "full", "attn", "mlp")
PRECISION = ("fp32", "bf16")
SHARD = ("none", "zero2", "zero3")
FIELDS = ("micro_batch", "accumulate", "checkpoint", "precision", "kernels", "compile", "shard", "offload")


class PlanError(Exception):
    """A plan override that cannot be applied; message and hint are shown as they are."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class Plan:
    batch: int  # sequences (pairs, for an encoder) per optimizer step: the statement's, never changed
    accumulate: int
    checkpoint: tuple[str, ...]  # one entry per layer
    precision: str = "fp32"
    kernels: tuple[str, ...] = KERNELS
    compile: bool = False
    world: int = 1  # data-parallel processes
    shard: str = "none"
    offload: bool = False

    @property
    def per_process(self) -> int:
        """Sequences of the step's batch the largest share of a process holds."""
        return math.ceil(self.batch / self.world)

    @property
    def micro_batch(self) -> int:
        return math.ceil(self.per_process / self.accumulate)

    def to_json(self) -> dict:
        d = asdict(self)
        d["checkpoint"], d["kernels"] = list(self.checkpoint), list(self.kernels)
        d["micro_batch"] = self.micro_batch
        return d

    def describe(self) -> str:
        """One line: `micro-batch 8 x 2, checkpoint none, fp32, kernels all, compile off`;
        a checkpoint on the first k layers reads `checkpoint full on layers 0-2 of 24`."""
        modes = set(self.checkpoint) or {"none"}
        checkpoint = modes.pop() if len(modes) == 1 else ",".join(self.checkpoint)
        k = next((i for i, c in enumerate(self.checkpoint) if c == "none"), len(self.checkpoint))
        if 0 < k < len(self.checkpoint) and len(set(self.checkpoint[:k])) == 1 \
                and set(self.checkpoint[k:]) == {"none"}:  # the plan search's layouts: the first k layers
            checkpoint = f"{self.checkpoint[0]} on layers 0-{k - 1} of {len(self.checkpoint)}"
        off = [k for k in KERNELS if k not in self.kernels]
        kernels = ("all" if not off else "all but " + ",".join(off) if len(off) <= 2
                   else ",".join(self.kernels) or "none")
        text = (f"micro-batch {self.micro_batch} x {self.accumulate}, checkpoint {checkpoint}, {self.precision}, "
                f"kernels {kernels}, compile {'on' if self.compile else 'off'}")
        if self.world > 1:
            text += f", {self.world} processes, " + ("DDP" if self.fsdp is None else f"FSDP2 {self.fsdp}")
        if self.offload:
            text += ", offload to host"
        return text

    @property
    def fsdp(self) -> str | None:
        """The FSDP2 mode the runtime wraps the model in ("zero2" / "zero3"), None for none
        (one process, or DDP). Offload goes through FSDP2: zero3 unless shard says zero2."""
        if self.shard != "none" and (self.world > 1 or self.offload):
            return self.shard
        return "zero3" if self.offload else None


_LAYER = re.compile(r"^layers\[(\d+)\]\.(attn|mlp)?")


def piece(ir_id: str, checkpoint: tuple[str, ...]) -> tuple[tuple | None, bool]:
    """Where activation checkpointing puts an IR node: its piece -- (layer,) for a whole
    layer, (layer, "attn" | "mlp" | "rest") when one sublayer of it is recomputed, None
    outside the layers -- and whether that piece is recomputed in backward. The one rule
    the runtime splits the graph by (effc.runtime.planned) and the cost model counts by
    (effc.compiler.cost)."""
    m = _LAYER.match(ir_id)
    if m is None:
        return None, False
    layer, sub = int(m.group(1)), m.group(2)
    mode = checkpoint[layer] if layer < len(checkpoint) else "none"
    if mode in ("attn", "mlp"):
        return (layer, mode if sub == mode else "rest"), sub == mode
    return (layer,), mode == "full"


def graph_pieces(ids, checkpoint: tuple[str, ...]) -> list[tuple[tuple, bool]]:
    """`piece` of each node of a graph, given its IR id in graph order ("" for a node
    lowered from none), with the nodes outside the layers keyed ("before",) -- the
    embedding -- or ("after",) -- the head and loss. The pieces the runtime splits the
    graph into (effc.runtime.planned) and FSDP2's groups (effc.compiler.cost) alike."""
    out, seen_layer = [], False
    for ir_id in ids:
        key, again = piece(ir_id, checkpoint)
        if key is None:
            key = ("after",) if seen_layer else ("before",)
        else:
            seen_layer = True
        out.append((key, again))
    return out


def layer_count(ir) -> int:
    """The transformer layers of an IR (ids `layers[i]...`)."""
    return len({n.id.split("]", 1)[0] for n in ir.nodes() if n.id.startswith("layers[")})


def default_plan(batch: int, accumulate: int, layers: int, world: int = 1) -> Plan:
    return Plan(batch, max(1, min(accumulate, math.ceil(batch / world))), ("none",) * layers, world=world)


def _bool(key: str, v: str) -> bool:
    if v.lower() in ("true", "on", "1", "yes"):
        return True
    if v.lower() in ("false", "off", "0", "no"):
        return False
    raise PlanError(f"--plan {key}={v}: not a boolean", f"write {key}=true or {key}=false")


def _int(key: str, v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise PlanError(f"--plan {key}={v}: not a positive integer", f"write {key}=N with N >= 1")
    return n


def apply(plan: Plan, key: str, value: str) -> Plan:
    """The plan with one field set from its text form."""
    v = value.strip()
    if key == "micro_batch":
        m = _int(key, v)
        return replace(plan, accumulate=math.ceil(plan.per_process / min(m, plan.per_process)))
    if key == "accumulate":
        n = _int(key, v)
        if n > plan.per_process:
            raise PlanError(f"--plan accumulate={n}: more micro-batches than the {plan.per_process} sequences "
                            f"of a process's share of the batch", f"use at most accumulate={plan.per_process}")
        return replace(plan, accumulate=n)
    if key == "checkpoint":
        parts = [p.strip() for p in v.split(",")]
        bad = [p for p in parts if p not in CHECKPOINT]
        if bad:
            raise PlanError(f"--plan checkpoint={v}: unknown choice '{bad[0]}'",
                            f"one of {', '.join(CHECKPOINT)} for every layer, or one per layer separated by commas")
        layers = len(plan.checkpoint)
        if len(parts) == 1:
            return replace(plan, checkpoint=(parts[0],) * layers)
        if len(parts) != layers:
            raise PlanError(f"--plan checkpoint={v}: {len(parts)} entries for a model of {layers} layers",
                            "give one choice for every layer, or a single one for all")
        return replace(plan, checkpoint=tuple(parts))
    if key == "precision":
        if v not in PRECISION:
            raise PlanError(f"--plan precision={v}: unknown precision", f"one of {', '.join(PRECISION)}")
        return replace(plan, precision=v)
    if key == "kernels":
        if v in ("all", "none"):
            return replace(plan, kernels=KERNELS if v == "all" else ())
        names = [k.strip() for k in v.split(",") if k.strip()]
        bad = [k for k in names if k not in KERNELS]
        if bad:
            raise PlanError(f"--plan kernels={v}: unknown kernel '{bad[0]}'",
                            f"all, none, or a comma list of {', '.join(KERNELS)}")
        return replace(plan, kernels=tuple(k for k in KERNELS if k in names))
    if key == "compile":
        return replace(plan, compile=_bool(key, v))
    if key == "offload":
        return replace(plan, offload=_bool(key, v))
    if key == "shard":
        if v not in SHARD:
            raise PlanError(f"--plan shard={v}: unknown choice", f"one of {', '.join(SHARD)}")
        return replace(plan, shard=v)
    raise PlanError(f"--plan {key}: no such plan field", f"the fields are {', '.join(FIELDS)}")


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """`key=value` strings -> pairs, checked for form (values are checked by `apply`)."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise PlanError(f"--plan {item}: expected key=value", f"for example --plan checkpoint=full; "
                            f"the fields are {', '.join(FIELDS)}")
        if key.strip() not in FIELDS:
            raise PlanError(f"--plan {key.strip()}: no such plan field", f"the fields are {', '.join(FIELDS)}")
        out.append((key.strip(), value))
    return out


def overridden(plan: Plan, overrides: list[tuple[str, str]]) -> Plan:
    for key, value in overrides:
        plan = apply(plan, key, value)
    return plan
